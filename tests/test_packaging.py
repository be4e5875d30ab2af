"""The wheel carries the grammar and the family rules, and works without the source checkout.

Builds the wheel (pip, with build isolation: hatchling comes from the package index; without
isolation when hatchling is already importable), installs it into a bare folder, and runs a
subprocess from another directory with only that folder added to the path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
import surgery
from surgery import rewrite
from surgery.models import tiny
from surgery.resources import data_dir, family_file
rules = "use llama\\napply lora(r=4) to attn.q, attn.v expect 8"
plan = rewrite(tiny("llama"), rules, dry_run=True)
print(json.dumps({
    "package": surgery.__file__,
    "grammar": str(data_dir("grammar")),
    "rules": str(family_file("llama")),
    "trainable": plan.trainable,
    "total": plan.total,
}))
print(plan.totals_line())
"""


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=240,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    args = ["wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    if importlib.util.find_spec("hatchling") is not None:
        args.insert(1, "--no-build-isolation")
    result = _pip(*args, cwd=out)
    if (
        result.returncode != 0
        and "hatchling" in result.stderr
        and "--no-build-isolation" not in args
    ):
        pytest.skip("the build backend (hatchling) is neither installed nor downloadable")
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("surgery-*.whl")
    return built


def test_wheel_contains_grammar_and_rules(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "surgery/_data/grammar/surgery.lark" in names
    assert "surgery/_data/rules/llama.surg" in names
    assert "surgery/_data/rules/falcon.surg" in names
    assert "surgery/__init__.py" in names
    # the shipped copies are the checkout's files, byte for byte
    with zipfile.ZipFile(wheel) as archive:
        assert (
            archive.read("surgery/_data/grammar/surgery.lark")
            == (ROOT / "grammar" / "surgery.lark").read_bytes()
        )
        assert (
            archive.read("surgery/_data/rules/llama.surg")
            == (ROOT / "rules" / "llama.surg").read_bytes()
        )
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "surgery = surgery.cli:main" in archive.read(entry_points).decode()


def test_installed_wheel_loads_grammar_and_rules_from_the_package(wheel: Path, tmp_path) -> None:
    target = tmp_path / "site"
    result = _pip("install", "--no-deps", "-q", "--target", str(target), str(wheel), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.strip().splitlines()
    found = json.loads(lines[0])
    installed = target.resolve()
    assert Path(found["package"]).resolve().is_relative_to(installed), found
    assert Path(found["grammar"]).resolve() == installed / "surgery" / "_data" / "grammar"
    assert (
        Path(found["rules"]).resolve() == installed / "surgery" / "_data" / "rules" / "llama.surg"
    )
    assert not Path(found["grammar"]).resolve().is_relative_to(ROOT)
    # tiny-llama, r=4 on q (64 -> 64) and v (64 -> 32) in 4 layers
    assert found["trainable"] == 4 * 4 * ((64 + 64) + (64 + 32))
    assert lines[1] == (
        f"trainable params: {found['trainable']:,d} || all params: {found['total']:,d} "
        f"|| trainable%: {100 * found['trainable'] / found['total']:.4f}"
    )
