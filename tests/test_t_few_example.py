"""examples/t_few.py runs end to end (fewer steps): IA3 trained with the T-Few losses lifts
rank-classification accuracy on the example's multiple-choice task well above chance, and every
loss it reports is finite."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "t_few.py"


def test_t_few_example_learns_the_task(capsys) -> None:
    spec = importlib.util.spec_from_file_location("t_few_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--steps", "100", "--pretrain-steps", "100", "--lr", "0.1"])
    assert result.accuracy_before < 0.4  # four choices: chance is 25%
    assert result.accuracy_after > 0.7, result.accuracy_after
    assert result.trainable == 4 * (32 + 32 + 172)  # IA3 on k, v and down_proj's input
    assert len(result.losses) == 100
    assert all(math.isfinite(v) for step in result.losses for v in step.values())
    first, last = result.losses[0], result.losses[-1]
    assert last["length_normalized"] < first["length_normalized"]
    assert last["unlikelihood"] < first["unlikelihood"]
    out = capsys.readouterr().out
    assert "accuracy before" in out and "accuracy after" in out and "ia3.surg" in out
