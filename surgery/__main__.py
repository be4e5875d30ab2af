"""`python -m surgery` is the `surgery` command."""

import sys

from surgery.cli import main

sys.exit(main())
