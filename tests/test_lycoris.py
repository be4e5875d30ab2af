"""LoHa and LoKr (LyCORIS) against PEFT 0.21's implementations, in the same process.

Each case is one PEFT config on a tiny Llama and the surgery rules it corresponds to. Both ways
through the codec (PEFT -> import -> rewrite; rewrite -> export -> PEFT), with non-trivial
weights: logits equal within 1e-5, trainable and total counts equal PEFT's, the merged model
equals the unmerged one and PEFT's merge_and_unload weights, and remove restores the model bit
for bit.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import (
    get_peft_config,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peft.tuners.lokr.layer import factorization as peft_factorization
from torch import nn

from surgery import PlanError, Site, rewrite
from surgery.edit import Edit
from surgery.io.peft_config import PeftFormatError
from surgery.methods import REGISTRY
from surgery.methods.codec import BY_PEFT_TYPE, CODECS
from surgery.methods.lokr import factorization
from surgery.models import tiny

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
TARGETS = ["q_proj", "v_proj", "down_proj"]

# (PEFT config fields, surgery rules making the same adapter); the configs mix full and factored
# Kronecker factors, per-module ranks and alphas, a decomposition factor and both initializations
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "loha": (
        {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": TARGETS,
         "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
        "apply loha(r=4, alpha=8) to *.self_attn.q_proj\n"
        "apply loha(r=4, alpha=3) to *.self_attn.v_proj\n"
        "apply loha(r=2, alpha=8) to *.mlp.down_proj",
    ),
    "lokr": (
        {"peft_type": "LOKR", "r": 2, "alpha": 4, "decompose_both": True,
         "target_modules": TARGETS, "rank_pattern": {"v_proj": 8}},
        "apply lokr(r=2, alpha=4, decompose_both=true) to *.self_attn.q_proj, *.mlp.down_proj\n"
        "apply lokr(r=8, alpha=4, decompose_both=true) to *.self_attn.v_proj",
    ),
    "lokr-factor": (
        {"peft_type": "LOKR", "r": 1, "alpha": 2, "decompose_factor": 4,
         "init_weights": "lycoris", "target_modules": ["q_proj", "down_proj"]},
        "apply lokr(r=1, alpha=2, decompose_factor=4, init=lycoris) to *.<q,down>_proj",
    ),
}


def peft_model(config: dict[str, Any]) -> nn.Module:
    return get_peft_model(tiny("llama"), get_peft_config(dict(config))).eval()


def randomize(model: nn.Module, seed: int = 5) -> None:
    """Move every trainable (adapter) tensor to non-trivial random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def saved_config(model: nn.Module) -> dict[str, Any]:
    """PEFT's config as adapter_config.json holds it (JSON: sets become lists)."""
    config = model.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=sorted))


def edits_of(model: nn.Module, plan: Any) -> list[Edit]:
    """The edit records a plan leaves on the model."""
    return list(plan.edits)


def imported(case: str) -> tuple[nn.Module, nn.Module, Any]:
    """A PEFT model with random adapter weights, and the same adapter imported into surgery."""
    config, _ = CASES[case]
    theirs = peft_model(config)
    randomize(theirs)
    codec = CODECS[BY_PEFT_TYPE[config["peft_type"]]]
    names = [name for name, _ in tiny("llama").named_modules()]
    rules, tensors = codec.import_(saved_config(theirs), get_peft_model_state_dict(theirs), names)
    ours = tiny("llama").eval()
    report = rewrite(ours, rules)
    result = ours.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == []
    assert set(tensors) == {k for k in ours.state_dict() if f".{codec.method}." in k}
    return theirs, ours, report


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_imports_to_equal_logits_and_counts(case: str) -> None:
    theirs, ours, report = imported(case)
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(tiny("llama").eval()), atol=1e-3)  # it matters
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", CASES)
def test_surgery_edits_export_to_equal_logits(case: str) -> None:
    _, rules = CASES[case]
    ours = tiny("llama").eval()
    report = rewrite(ours, rules)
    randomize(ours)
    method = report.plan.steps[0].method
    config, weights = CODECS[method].export(
        edits_of(ours, report.plan), ours.state_dict(), tiny("llama")
    )
    theirs = peft_model(config)
    assert theirs.get_nb_trainable_parameters() == (report.trainable, report.total)
    result = set_peft_model_state_dict(theirs, weights)
    assert result.unexpected_keys == []
    assert not any(f"{method}_" in k or "hada_" in k for k in result.missing_keys)
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_and_peft_merge(case: str) -> None:
    theirs, ours, _ = imported(case)
    unmerged = logits(ours)
    rewrite(ours, "merge")
    assert not any(isinstance(m, Site) for m in ours.modules())
    torch.testing.assert_close(logits(ours), unmerged, rtol=1e-5, atol=1e-5)
    plain = theirs.merge_and_unload().state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(plain)
    for key, value in plain.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_remove_restores_the_model_bit_for_bit(case: str) -> None:
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    rewrite(model, CASES[case][1])
    randomize(model)
    rewrite(model, "remove")
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_factorization_is_peft_s() -> None:
    for dimension in range(1, 400):
        for factor in (-1, 1, 2, 3, 4, 6, 8, 16, 64):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_conv1d_merges_exactly_and_is_not_exported(method: str) -> None:
    """GPT-2's Conv1D stores its weight [in, out]: the branch and the merge handle it; PEFT's
    LoHa/LoKr do not support it, so the export refuses it."""
    model = tiny("gpt2").eval()
    report = rewrite(model, f"apply {method}(r=2) to *.attn.c_proj, *.mlp.c_fc")
    randomize(model)
    unmerged = logits(model)
    with pytest.raises(PeftFormatError, match="Conv1D"):
        CODECS[method].export(edits_of(model, report.plan), model.state_dict(), tiny("gpt2"))
    rewrite(model, "merge")
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "rule, message",
    [
        ("apply loha(rank_dropout=0.1) to *.q_proj", "no parameter 'rank_dropout'"),
        ("apply lokr(module_dropout=0.1) to *.q_proj", "no parameter 'module_dropout'"),
        ("apply loha(init_weights=false) to *.q_proj", "no parameter 'init_weights'"),
        ("apply lokr(decompose_factor=0) to *.q_proj", "must be -1 or at least 1"),
        ("apply loha to *.self_attn", "attaches to Linear layers"),
        ("apply lokr to *.input_layernorm", "attaches to Linear layers"),
    ],
)
def test_what_is_not_implemented_is_refused(rule: str, message: str) -> None:
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=message):
        rewrite(model, rule)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("field", ["rank_dropout", "module_dropout"])
def test_import_refuses_peft_dropouts(field: str) -> None:
    config = {**CASES["lokr"][0], field: 0.1}
    theirs = peft_model(config)
    with pytest.raises(PeftFormatError, match=field):
        CODECS["lokr"].import_(saved_config(theirs), get_peft_model_state_dict(theirs), [])


def test_import_refuses_tensors_that_disagree_with_the_config() -> None:
    config = CASES["lokr"][0]
    theirs = peft_model(config)
    tensors = get_peft_model_state_dict(theirs)
    wrong = {**saved_config(theirs), "decompose_both": False}  # W1 would be full
    with pytest.raises(PeftFormatError, match="config and the weights"):
        CODECS["lokr"].import_(wrong, tensors, [])


def test_llama_2_7b_counts_equal_peft_s() -> None:
    """The counts the docs give, against PEFT on the same meta-device skeleton."""
    from peft import LoHaConfig, LoKrConfig

    from surgery.models import load_model

    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for rule, config, count in [
        ("apply loha to *.self_attn.<q,v>_proj", LoHaConfig(target_modules=["q_proj", "v_proj"]),
         8_388_608),
        ("apply lokr to *.self_attn.<q,k,v,o>_proj, *.mlp.<gate,up,down>_proj",
         LoKrConfig(target_modules=seven), 1_331_200),
    ]:
        plan = rewrite(load_model("llama-2-7b", meta=True), rule, dry_run=True)
        theirs = get_peft_model(load_model("llama-2-7b", meta=True), config)
        assert (plan.trainable, plan.total) == theirs.get_nb_trainable_parameters()
        assert plan.trainable == count


# ---- properties over random layer sizes and arguments ------------------------------------------

DIMS = st.integers(1, 96)


@st.composite
def lokr_arguments(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "r": draw(st.integers(1, 24)),
        "alpha": float(draw(st.integers(1, 16))),
        "decompose_both": draw(st.booleans()),
        "decompose_factor": draw(st.sampled_from([-1, 1, 2, 3, 4, 8, 16])),
        "init": draw(st.sampled_from(["peft", "lycoris"])),
    }


def peft_shapes(layer: nn.Module, prefix: str) -> dict[str, tuple[int, ...]]:
    return {
        name.split(".")[0].removeprefix(prefix): tuple(p.shape)
        for name, p in layer.named_parameters()
        if name.startswith(prefix)
    }


@settings(max_examples=60, deadline=None)
@given(n_in=DIMS, n_out=DIMS, args=lokr_arguments())
def test_lokr_tensors_are_peft_s_for_any_shape(n_in: int, n_out: int, args: dict[str, Any]) -> None:
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import Linear as PeftLoKr

    config = LoKrConfig(
        r=args["r"],
        decompose_both=args["decompose_both"],
        decompose_factor=args["decompose_factor"],
        init_weights="lycoris" if args["init"] == "lycoris" else True,
    )
    layer = PeftLoKr(nn.Linear(n_in, n_out), "default", config=config, r=args["r"], alpha=1.0)
    expected = peft_shapes(layer, "lokr_")
    assert REGISTRY["lokr"].parameter_shapes(nn.Linear(n_in, n_out), args) == expected


class One(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@settings(max_examples=40, deadline=None)
@given(n_in=DIMS, n_out=DIMS, args=lokr_arguments(), loha=st.booleans())
def test_identity_then_merge_for_any_shape(
    n_in: int, n_out: int, args: dict[str, Any], loha: bool
) -> None:
    torch.manual_seed(0)
    model = One(n_in, n_out).eval()
    x = torch.randn(3, n_in, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    if loha:
        rule = f"apply loha(r={args['r']}, alpha={args['alpha']}) to proj"
    else:
        rule = "apply lokr(" + ", ".join(
            f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items()
        ) + ") to proj"
    rewrite(model, rule)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    randomize(model)
    with torch.no_grad():
        unmerged = model(x)
    rewrite(model, "merge")
    assert isinstance(model.proj, nn.Linear)
    with torch.no_grad():
        scale = max(float(unmerged.abs().max()), 1.0)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("alpha", ["8", -1, float("nan"), True])
def test_import_refuses_a_malformed_alpha(alpha: Any) -> None:
    theirs = peft_model(CASES["loha"][0])
    config = {**saved_config(theirs), "alpha_pattern": {}, "alpha": alpha}
    with pytest.raises(PeftFormatError, match="alpha"):
        CODECS["loha"].import_(config, get_peft_model_state_dict(theirs), [])
