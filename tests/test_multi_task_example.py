"""examples/multi_task.py (`make demo`) runs end to end, fast: its per-task accuracies are what
the mixed batch wrote (recomputed here from the tokens), every row of that batch is what the row
writes alone through its own adapter, and PEFT wrote the same tokens. The README tour's
mixed-task batch runs and says what it shows."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from surgery.adapters.units import set_active

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multi_task.py"


def load_example():
    spec = importlib.util.spec_from_file_location("multi_task_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_multi_task_example_accuracies_are_computed(capsys) -> None:
    example = load_example()
    result = example.main(["--steps", "40", "--rows", "3", "--repeats", "1"])
    out = capsys.readouterr().out

    # the targets are each row's task applied to its prompt
    x = result.prompts[:, : example.K] - example.FIRST
    for i, task in enumerate(result.rows):
        assert torch.equal(result.targets[i] - example.FIRST, example.TASKS[task](x[i]))
    # the accuracies are the mixed batch's exact matches, and the table prints them
    exact = (result.generated == result.targets).all(dim=1).float()
    for task in example.TASKS:
        mine = [i for i, r in enumerate(result.rows) if r == task]
        assert result.accuracy[task] == exact[mine].mean().item()
        shown = f"{result.accuracy[task]:.0%}"
        assert re.search(rf"│\s+{task} │\s+{shown} │", out), (task, shown)
    # training taught something the base model cannot do, and that the wrong adapter does not
    assert sum(result.accuracy.values()) > sum(result.base_accuracy.values())
    assert sum(result.accuracy.values()) > sum(result.wrong_accuracy.values())
    assert all(loss[-1] < loss[0] for loss in result.losses.values())

    # every row of the mixed batch is that row alone, through its own adapter
    model = result.model
    for task in example.TASKS:
        rows = [i for i, r in enumerate(result.rows) if r == task]
        set_active(model, task)
        alone = example.generate(model, result.prompts[rows], None)
        assert torch.equal(alone, result.generated[rows]), task

    assert result.peft_agrees and "PEFT wrote the same tokens: yes" in out
    assert result.surgery_seconds > 0 and result.peft_seconds > 0


def test_untrained_adapters_solve_nothing() -> None:
    """The accuracies follow the weights: with no training step, no row is solved."""
    result = load_example().main(["--steps", "0", "--rows", "2", "--repeats", "1"])
    assert set(result.accuracy.values()) == {0.0}
    assert result.peft_agrees


def readme_mixed_batch() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "adapter_names=" in b]
    return block


def test_readme_mixed_batch_runs_as_shown() -> None:
    """The README's five lines: two adapters, one generate in which each row names its own."""
    from surgery import SurgeryError, rewrite
    from surgery.adapters.units import active_adapters, adapter_names
    from surgery.models import tiny

    block = readme_mixed_batch()
    assert len(block.strip().splitlines()) == 6  # five statements, one over two lines
    namespace = {"torch": torch, "rewrite": rewrite, "tiny": tiny}
    exec(compile(block, "README.md", "exec"), namespace)
    model, ids, out = namespace["model"], namespace["ids"], namespace["out"]
    assert adapter_names(model) == ["sql", "chat"] and active_adapters(model) == ("sql",)
    assert out.shape == (3, ids.shape[1] + 8) and torch.equal(out[:, : ids.shape[1]], ids)
    with pytest.raises(SurgeryError, match="no adapter named 'sqll'"):  # never ignored
        model(ids, adapter_names=["sql", "chat", "sqll"])
