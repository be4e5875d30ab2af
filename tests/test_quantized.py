"""Quantized bases (docs/quantization.md): LoRA, DoRA and IA3 apply and train over bitsandbytes,
torchao and optimum-quanto layers; PEFT's logits and counts on the same bnb model; the quantized
storage never changes in training; what surgery does not know is refused at plan time by name.

Quantized tiny Llamas are built from the seeded fp32 one (hidden 64), so two builds are equal.
"""

from __future__ import annotations

import ast
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import surgery
from surgery import rewrite
from surgery.errors import PlanError
from surgery.models import tiny

IDS = torch.tensor([[3, 17, 42, 7, 99, 1, 250, 64], [5, 6, 7, 8, 9, 10, 11, 12]])
DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Every decoder projection replaced by `make(linear)` (the head stays fp32, as in QLoRA)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in DECODER:
                setattr(module, name, make(child))
    return model


def bnb8(linear: nn.Linear) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        has_fp16_weights=False, threshold=0.0,
    )
    layer.weight = bnb.nn.Int8Params(
        linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False
    )
    return layer.to("cpu")  # quantizes


def bnb4(quant_type: str = "nf4", double: bool = True) -> Callable[[nn.Linear], nn.Module]:
    def make(linear: nn.Linear) -> nn.Module:
        bnb = pytest.importorskip("bitsandbytes")
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=double,
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, quant_type=quant_type,
            compress_statistics=double,
        )
        return layer.to("cpu")

    return make


def ao_nf4(linear: nn.Linear) -> nn.Module:
    ao = pytest.importorskip("torchao.quantization")
    # scaler blocks of 4: every tiny projection's scaler count (32, 64, 172) divides by 4
    linear.weight = nn.Parameter(ao.to_nf4(linear.weight.data, 64, 4), requires_grad=False)
    return linear


def quantized(kind: str) -> nn.Module:
    """The tiny Llama with its decoder projections quantized as `kind`."""
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")
    model = tiny("llama").eval()
    if kind == "bnb8":
        model.is_loaded_in_8bit = True  # what from_pretrained sets; PEFT reads it
        return swap_linears(model, bnb8)
    if kind in ("nf4", "fp4", "nf4-single"):
        model.is_loaded_in_4bit = True
        return swap_linears(model, bnb4(kind[:3], double=kind == "nf4"))
    if kind == "ao-nf4":
        return swap_linears(model, ao_nf4)
    if kind == "ao-int8":
        ao = pytest.importorskip("torchao.quantization")
        ao.quantize_(model.model, ao.Int8WeightOnlyConfig())
        return model
    quanto = pytest.importorskip("optimum.quanto")
    quanto.quantize(model.model, weights=getattr(quanto, kind.removeprefix("quanto-")))
    quanto.freeze(model.model)
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


# ---- PEFT on the same quantized model ----------------------------------------------------------

PEFT_CASES = {
    "bnb8-lora": ("bnb8", "apply lora(r=4, alpha=8) to *.<q,v>_proj", "lora", {}),
    "nf4-lora": ("nf4", "apply lora(r=4, alpha=8) to *.<q,v>_proj, *.down_proj", "lora", {}),
    "fp4-dora": ("fp4", "apply dora(r=4, alpha=8) to *.<q,v>_proj", "lora", {"use_dora": True}),
    "bnb8-dora": ("bnb8", "apply dora(r=4, alpha=8) to *.<q,v>_proj", "lora", {"use_dora": True}),
    "nf4-ia3": (
        "nf4",
        "apply ia3 to *.<k,v>_proj\napply ia3(on=input) to *.down_proj",
        "ia3",
        {},
    ),
}


def peft_model(kind: str, method: str, extra: dict) -> nn.Module:
    peft = pytest.importorskip("peft")
    model = quantized(kind)
    if method == "lora":
        targets = ["q_proj", "v_proj"] + (["down_proj"] if kind == "nf4" else [])
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra)
    else:
        config = peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
    model = peft.get_peft_model(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                center = 1.0 if "ia3" in name or "magnitude" in name else 0.0
                p.copy_(center + 0.2 * torch.randn(p.shape, generator=generator))
    return model


def surgery_key(peft_key: str) -> str:
    """PEFT's adapter key as surgery's (`...q_proj.lora_A.default.weight` -> `...q_proj.lora.A`)."""
    path = peft_key.removeprefix("base_model.model.")
    for theirs, ours in (
        (".lora_A.default.weight", ".lora.A"),
        (".lora_B.default.weight", ".lora.B"),
        (".lora_magnitude_vector.default.weight", ".dora.m"),
        (".ia3_l.default", ".ia3.l"),
    ):
        path = path.replace(theirs, ours)
    return path


@pytest.mark.parametrize("case", PEFT_CASES)
def test_same_logits_and_counts_as_peft(case):
    kind, rules, method, extra = PEFT_CASES[case]
    theirs = peft_model(kind, method, extra)
    ours = quantized(kind)
    report = rewrite(ours, rules)
    values = {surgery_key(k): p for k, p in theirs.named_parameters() if p.requires_grad}
    params = dict(ours.named_parameters())
    if "dora" in rules:  # surgery names its DoRA edits `dora`: LoRA's A and B live there too
        values = {k.replace(".lora.", ".dora."): v for k, v in values.items()}
    assert set(values) == {k for k, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for key, value in values.items():
            params[key].copy_(value.reshape(params[key].shape))
    assert torch.allclose(logits(ours), logits(theirs), atol=1e-5, rtol=0)
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (report.trainable, report.total) == (trainable, total)
    assert (report.plan.trainable, report.plan.total) == (trainable, total)


# ---- training changes the adapters only --------------------------------------------------------


def train_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Three AdamW steps on the LM loss (the adapters are fp32 and the loss falls); returns the
    adapters as they were before training."""
    adapters = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    return adapters


def storage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the quantized layers hold, as raw bytes: weights, bnb's quant_state (absmax,
    nested absmax, code), LLM.int8()'s row scales, torchao's inner tensors."""
    from surgery.quantized import _leaves

    found: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        for i, leaf in enumerate(_leaves(weight)):
            found[f"{name}.weight.{i}"] = leaf.detach().clone()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            nested = [state.state2.absmax, state.state2.code, state.offset] if state.nested else []
            for i, t in enumerate([state.absmax, state.code, *nested]):
                found[f"{name}.quant_state.{i}"] = t.clone()
        for holder in (weight, getattr(module, "state", None)):
            if getattr(holder, "SCB", None) is not None:
                found[f"{name}.SCB"] = holder.SCB.clone()
    return {k: v.view(torch.uint8) if v.dim() else v for k, v in found.items()}


@pytest.mark.parametrize("kind", ["nf4", "bnb8", "ao-int8"])
def test_training_changes_only_the_adapters(kind):
    model = quantized(kind).train()
    rewrite(model, "apply lora(r=4) to *.<q,v>_proj, *.down_proj")
    before = storage(model)
    frozen = {  # the plain ones (norms, embeddings, head); `storage` holds the quantized ones
        k: p.detach().clone()
        for k, p in model.named_parameters()
        if not p.requires_grad and type(p) is nn.Parameter
    }
    adapters = train_adapters(model)
    after = storage(model)
    assert before.keys() == after.keys() and len(before) > 20
    assert all(torch.equal(before[k], after[k]) for k in before), "quantized storage changed"
    for key, value in frozen.items():
        assert torch.equal(dict(model.named_parameters())[key].detach(), value), key
    assert all(
        not torch.equal(dict(model.named_parameters())[k].detach(), v)
        for k, v in adapters.items()
        if k.endswith(".B")
    )


@pytest.mark.parametrize("kind", ["fp4", "ao-nf4", "quanto-qint8", "quanto-qint4"])
@pytest.mark.parametrize("rules", ["apply dora(r=4) to *.q_proj", "apply ia3 to *.v_proj"])
def test_insertion_is_identity(kind, rules):
    model = quantized(kind)
    before = logits(model)
    rewrite(model, rules)
    assert torch.equal(logits(model), before)


# ---- what is refused at plan time ---------------------------------------------------------------


def refused(model: nn.Module, rules: str) -> str:
    state = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(PlanError) as info:
        rewrite(model, rules)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    return str(info.value)


def test_methods_without_quantized_support_are_refused():
    message = refused(quantized("nf4"), "apply loha(r=4) to *.q_proj")
    assert "Linear4bit" in message and "quantized" in message and "lora, dora, ia3 do" in message


def test_inits_from_the_weight_are_refused():
    message = refused(quantized("bnb8"), "apply lora(r=4, init=pissa) to *.q_proj")
    assert "quantized Linear8bitLt" in message


class PackedLinear(nn.Linear):
    """A quantized-looking Linear surgery does not know: int8 storage."""

    def __init__(self):
        super().__init__(64, 64, bias=False)
        self.weight = nn.Parameter(torch.zeros(64, 64, dtype=torch.int8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.float().T


def test_unknown_quantized_layers_are_refused_by_class():
    model = tiny("llama")
    model.model.layers[0].self_attn.q_proj = PackedLinear()
    for method in ("lora", "ia3"):
        message = refused(model, f"apply {method} to model.layers.0.self_attn.q_proj")
        assert "PackedLinear" in message and "torch.int8" in message


def test_unfrozen_quanto_is_refused():
    quanto = pytest.importorskip("optimum.quanto")
    model = tiny("llama")
    quanto.quantize(model.model, weights=quanto.qint8)  # not frozen
    assert "freeze" in refused(model, "apply lora to *.q_proj")


def test_hqq_is_recognised_without_importing_hqq(monkeypatch):
    """A stand-in for hqq's module makes its layer class known, as importing hqq would (the
    real import costs seconds: tests/test_hqq.py runs the real layer). An HQQLinear is a Linear
    of the shape it records, which only lora, dora and ia3 take."""
    from surgery.fused import projection_dims

    module = types.ModuleType("hqq.core.quantize")

    class HQQLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.meta = {"shape": torch.Size([48, 64])}  # [out, in]
            self.W_q = nn.Parameter(torch.zeros(48, 32, dtype=torch.uint8), requires_grad=False)

    module.HQQLinear = HQQLinear
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", module)
    model = tiny("llama")
    model.model.layers[0].self_attn.q_proj = layer = HQQLinear()
    assert projection_dims(layer) == (64, 48)
    message = refused(model, "apply loha(r=4) to model.layers.0.self_attn.q_proj")
    assert "(HQQLinear: HQQ HQQLinear); lora, dora, ia3 do" in message


def test_surgery_never_imports_a_quantization_library():
    """surgery.quantized looks the libraries up in sys.modules: no module of surgery imports one
    (a subprocess check costs seconds of transformers imports; the source says it exactly)."""
    libraries = ("bitsandbytes", "torchao", "optimum", "hqq")
    found = []
    for path in Path(surgery.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in libraries]
        text = path.read_text()
        found += [f"{path.name}: {lib}" for lib in libraries if f'import_module("{lib}' in text]
    assert not found


def test_blocks_holding_quantized_layers_are_refused():
    """A method on a whole block would not know the quantized layers inside it: refused,
    naming the layer."""
    message = refused(quantized("nf4"), "apply parallel_adapter to model.layers.0.mlp")
    assert "gate_proj.weight" in message and "Params4bit" in message
    assert "a quantized layer inside the selected module" in message


def check_routing_and_saving(model, report, rules: str, fresh: nn.Module, folder) -> None:
    """Rows routed to adapters a and b equal each adapter alone, and adapter b saved to
    `folder` and loaded onto the `fresh` base computes b's logits: what every quantized base
    must keep (the adapters already moved off their identity)."""
    from surgery import load_adapter
    from surgery.adapters.units import set_active
    from surgery.io import write_adapter_dir

    with torch.no_grad():
        routed = model(input_ids=IDS, adapter_names=["a", "b"]).logits
    alone = {}
    for name in ("a", "b"):
        set_active(model, name)
        alone[name] = logits(model)
    assert torch.allclose(routed[0], alone["a"][0], atol=1e-5)
    assert torch.allclose(routed[1], alone["b"][1], atol=1e-5)
    write_adapter_dir(model, folder, rules_text=rules, plan=report.plan, adapter="b")
    load_adapter(fresh, folder)
    assert torch.allclose(logits(fresh), alone["b"], atol=1e-6)


def test_adapters_route_and_save_over_a_quantized_base(tmp_path):
    """Per-row routing (DoRA's norm from the dequantized weight) equals each adapter alone; a
    saved adapter loads onto a fresh quantized model and computes the same logits."""
    rules = "adapter b { apply dora(r=4) to *.q_proj }\nadapter a { apply lora(r=4) to *.q_proj }"
    model = quantized("bnb8")
    report = rewrite(model, rules)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    check_routing_and_saving(model, report, rules, quantized("bnb8"), tmp_path / "b")
