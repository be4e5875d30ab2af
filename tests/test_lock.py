"""The lock file: `make test` and `make demo` install exact, complete, current pins from it.

Checked here: every line pins one release; pyproject's dependencies, its `dev` extra and its
build backend are all in it, within pyproject's bounds; every locked package's own requirements
are locked too (for those installed where the suite runs, which under `make test` is all of
them); torch is the Makefile's pin without a local build tag; and the Makefile, CI and README
use and document it.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def applies(requirement: Requirement, extra: str = "") -> bool:
    return requirement.marker is None or requirement.marker.evaluate(
        default_environment() | {"extra": extra}
    )


def test_every_requirement_of_pyproject_is_locked_within_its_bounds() -> None:
    pins = locked()
    project = pyproject()
    wanted = [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["dev"],
        *project["build-system"]["requires"],
    ]
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in the lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"lock has {name}=={pins[name]}, outside pyproject's {requirement.specifier}"
        )


def test_every_dependency_states_a_tested_range() -> None:
    """A lower bound (what was tested) and an upper bound (the next major) on each one."""
    project = pyproject()["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        operators = {s.operator for s in Requirement(text).specifier}
        assert {">=", "<"} <= operators, f"{text}: needs a lower and an upper bound"


def test_the_lock_is_closed_under_dependencies() -> None:
    pins = locked()
    checked = 0
    for name in pins:
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. the build backend outside `make test`)
        checked += 1
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if applies(requirement):
                assert canonicalize_name(requirement.name) in pins, (
                    f"{name} needs {requirement.name}, which the lock does not pin"
                )
    assert checked >= len(pins) // 2


def test_torch_is_the_makefile_pin_without_a_local_tag() -> None:
    makefile = (ROOT / "Makefile").read_text()
    pin = re.search(r"^TORCH\s*\?=\s*torch==(\S+)$", makefile, re.M)
    assert pin is not None
    torch = locked()["torch"]
    assert torch.local is None  # installable from PyPI too; the local wheel still matches it
    assert torch == Version(pin[1])
    assert not any(name.startswith("nvidia-") for name in locked())


@pytest.mark.parametrize(
    "line",
    [
        r"^\$\(VENV\)/\.installed: \$\(LOCK\)",  # the venv is rebuilt when the lock changes
        r"pip install -q -r \$\(LOCK\)$",
        r"pip install -q --no-deps --no-build-isolation -e \.$",
        r"^lock: ",
        r"pip-compile .*--upgrade",
        r"^test-latest:",
        r"\$\(LATEST\)/bin/python -m pytest$",
        r"^clean:\n\trm -rf \$\(VENV\) \$\(LATEST\)",
    ],
)
def test_the_makefile_installs_from_the_lock(line: str) -> None:
    assert re.search(line, (ROOT / "Makefile").read_text(), re.M), line
    assert "LOCK   := requirements/lock.txt" in (ROOT / "Makefile").read_text()


def test_ci_readme_and_gitignore_agree() -> None:
    assert "make test\n" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make lock" in readme and "requirements/lock.txt" in readme
    assert "make test-latest" in readme
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv-latest/" in ignored and ".venv-tools/" in ignored
