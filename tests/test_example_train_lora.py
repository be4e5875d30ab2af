"""examples/train_lora.py runs end to end (fewer steps): the loss drops, the adapter is saved,
reloaded, merged, and the merged model generates."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lora.py"


def test_train_lora_example(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("train_lora_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--steps", "80", "--out", str(tmp_path / "adapter")])
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter.safetensors",
        "plan.json",
        "rules.surg",
    ]
    assert result.text.startswith("alice likes") and len(result.text) > len("alice likes")
    out = capsys.readouterr().out
    assert "trainable params: 7,168" in out and "merged model:" in out
