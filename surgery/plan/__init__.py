"""Resolve + validate: a `Program` and a model -> a `Plan`, with nothing mutated.

One module per job: `types` (Plan, Step), `document` (their JSON form, validated), `planner`
(the walk over the model's simulated tree and the edit records), the statement handlers
(`statements`, `apply`, `merges`, each registered for its AST class) and `lint` (model-free
checks). Importing the package registers every handler.
"""

from surgery.families import family_index
from surgery.plan import apply, combine, merges, prepare, statements  # noqa: F401  (registers)
from surgery.plan.document import MalformedPlan
from surgery.plan.lint import LintWarning, lint
from surgery.plan.planner import HANDLERS, Planner, handles, make_plan
from surgery.plan.statements import part_selectors
from surgery.plan.types import Plan, Step, totals_line

__all__ = [
    "HANDLERS",
    "LintWarning",
    "MalformedPlan",
    "Plan",
    "Planner",
    "Step",
    "family_index",
    "handles",
    "lint",
    "make_plan",
    "part_selectors",
    "totals_line",
]
