"""examples/qlora.py runs end to end (fewer steps): LoRA trains on an nf4 base prepared by
`prepare_kbit` (loss drops, nf4 bytes unchanged), and `surgery merge` streams the adapter into the
original fp32 checkpoint exactly as the in-memory merge does, with the fp32 base + adapter's
logits."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "qlora.py"


def test_qlora_example(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("qlora_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = module.main(["--steps", "12", "--work", str(tmp_path)])
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    assert result.cast == 11  # embed, 2 norms x 4 layers, final norm, head
    assert result.merged_equal
    assert result.logits_error < 1e-5
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter.safetensors",
        "plan.json",
        "rules.surg",
    ]
    out = capsys.readouterr().out
    assert "surgery merge --model" in out and "bit for bit: True" in out
