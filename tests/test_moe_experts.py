"""LoRA and IA3 on MoE expert parameters (3-D, one adapter per expert), expert subsets, and the
parameter placement's guarantees: identity at insertion, transparent state dict keys, exact merge
(in memory and streamed), bit-exact remove, the planner's refusals, routing refused, compile."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from surgery import PlanError, ResolveError, rewrite
from surgery.adapters.router import RoutingError
from surgery.adapters.units import set_active
from surgery.errors import ModelLoadError
from surgery.graph.param_site import ParamSite
from surgery.io import write_adapter_dir
from surgery.io.checkpoint import merge_checkpoint
from surgery.io.load import load_adapter

IDS = torch.arange(2, 14).unsqueeze(0)
# hidden 32, 2·intermediate 48: a side mix-up cannot hide behind a square matrix
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)


def mixtral() -> nn.Module:
    return MixtralForCausalLM(MixtralConfig(**COMMON, num_key_value_heads=2, intermediate_size=24,
                                            num_local_experts=4, num_experts_per_tok=2))


def qwen2_moe() -> nn.Module:
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        **COMMON, num_key_value_heads=2, intermediate_size=24, moe_intermediate_size=24,
        shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2))


def qwen3_moe() -> nn.Module:
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        **COMMON, num_key_value_heads=2, head_dim=8, intermediate_size=24,
        moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2))


def gpt_oss() -> nn.Module:  # experts stored [E, in, out], with biases
    return GptOssForCausalLM(GptOssConfig(**COMMON, num_key_value_heads=2, head_dim=8,
                                          intermediate_size=24, num_local_experts=4,
                                          num_experts_per_tok=2))


def deepseek_v3() -> nn.Module:  # MLA attention, a shared expert beside the routed ones
    return DeepseekV3ForCausalLM(DeepseekV3Config(
        **COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=24,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8))


FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "gpt_oss": gpt_oss,
    "deepseek_v3": deepseek_v3,
}
EXPERTS = "model.layers.0.mlp.experts"


def build(family: str = "mixtral") -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # routers start at zero in some families: make routing real
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.normal_(std=0.5)
    return model


def perturb(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # the adapters (apply freezes the base)
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def real_counts(model: nn.Module) -> tuple[int, int]:
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_experts_is_exact_on_every_family(family: str) -> None:
    model = build(family)
    before, base = snapshot(model), logits(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    rules = "apply lora(r=4) to *.mlp.experts.gate_up_proj, *.mlp.experts.down_proj"
    report = rewrite(model, rules)
    assert torch.equal(logits(model), base)  # identity at insertion, bit for bit
    assert (report.plan.steps[-1].trainable_after, report.plan.steps[-1].total_after) == (
        real_counts(model)
    )
    keys = set(model.state_dict())
    adapter_keys = {f"{EXPERTS}.{p}.lora.{t}" for p in ("gate_up_proj", "down_proj") for t in "AB"}
    assert keys == set(before) | adapter_keys  # transparent: the plain keys, adapters beside
    perturb(model)
    edited = logits(model)
    assert not torch.allclose(edited, base)
    merged = copy.deepcopy(model)
    rewrite(merged, "merge")
    torch.testing.assert_close(logits(merged), edited, rtol=1e-5, atol=1e-5)
    assert set(merged.state_dict()) == set(before)
    rewrite(model, "remove")
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: type(m) for n, m in model.named_modules()} == classes


def test_counts_are_per_expert_factors_and_only_adapters_train() -> None:
    model = build()
    report = rewrite(model, "apply lora(r=4) to *.mlp.experts.gate_up_proj")
    # 4 experts · r · (in 32 + out 48)
    assert report.trainable == 4 * 4 * (32 + 48)
    model(IDS).logits.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {f"{EXPERTS}.gate_up_proj.lora.A", f"{EXPERTS}.gate_up_proj.lora.B"}


def expert_output(model: nn.Module, expert: int) -> torch.Tensor:
    """The experts module's output when every token goes to `expert` alone."""
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    index = torch.full((6, 1), expert)
    with torch.no_grad():
        return experts(hidden, index, torch.ones(6, 1))


@pytest.mark.parametrize("method", ["lora(r=2)", "ia3(on=input)"])
def test_a_subset_of_experts_changes_only_those(method: str) -> None:
    model = build()
    base = [expert_output(model, e) for e in range(4)]
    report = rewrite(model, f"apply {method} to *.mlp.experts.gate_up_proj[1, 3]")
    perturb(model)
    assert report.plan.steps[-1].targets[0].options[1] == ("experts", (1, 3))
    for expert in range(4):
        same = torch.equal(expert_output(model, expert), base[expert])
        assert same == (expert not in (1, 3)), expert
    if method.startswith("lora"):
        assert report.trainable == 2 * 2 * (32 + 48)  # the subset's experts only
    else:
        assert report.trainable == 2 * 32
    merged = copy.deepcopy(model)
    rewrite(merged, "merge")
    for expert in range(4):
        torch.testing.assert_close(expert_output(merged, expert), expert_output(model, expert))


def test_slices_and_negative_indices_pick_experts() -> None:
    model = build()
    report = rewrite(model, "apply lora(r=2) to *.mlp.experts.down_proj[0:2, -1]")
    assert dict(report.plan.steps[-1].targets[0].options)["experts"] == (0, 1, 3)


@pytest.mark.parametrize(
    ("rule", "error", "words"),
    [
        ("apply lora to *.mlp.experts.gate_up_proj[4]", ResolveError, "out of range"),
        ("apply lora to *.mlp.experts.gate_up_proj[2:9]", ResolveError, "past the last expert"),
        ("apply lora to *.mlp.experts.gate_up_proj[1, 1]", ResolveError, "already picked"),
        ("apply lora to *.q_proj.weight[0]", ResolveError, "2-D parameter"),
        ("apply lora to *.q_proj.weight", PlanError, "3-D expert parameters"),
        ("apply lora(dropout=0.1) to *.experts.gate_up_proj", PlanError, "dropout"),
        ("apply lora(bias=true) to *.experts.gate_up_proj", PlanError, "bias"),
        ("apply lora(init=pissa) to *.experts.gate_up_proj", PlanError, "init=pissa"),
        ("apply lora(r=40) to *.experts.gate_up_proj", PlanError, "rank limit"),
        ("apply prompt to *.experts.gate_up_proj", PlanError, "acts on modules"),
        ("apply lora_experts to *.q_proj", PlanError, "selects modules"),
        ("apply lora to *.q_proj, *.experts.gate_up_proj", PlanError, "both modules and"),
    ],
)
def test_refusals_are_located_and_leave_the_model_alone(
    rule: str, error: type[Exception], words: str
) -> None:
    model = build()
    before = snapshot(model)
    with pytest.raises(error, match=words) as raised:
        rewrite(model, rule)
    assert raised.value.span is not None  # type: ignore[attr-defined]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(isinstance(m, ParamSite) for m in model.modules())


def test_out_of_range_expert_points_at_the_index_item() -> None:
    with pytest.raises(ResolveError) as raised:
        rewrite(build(), "apply lora to *.mlp.experts.gate_up_proj[0, 7]")
    assert raised.value.span.column == len("apply lora to *.mlp.experts.gate_up_proj[0, ") + 1


def test_a_misspelt_parameter_gets_did_you_mean() -> None:
    with pytest.raises(ResolveError) as raised:
        rewrite(build(), "apply lora to *.mlp.experts.gate_up_prj")
    assert "gate_up_proj" in (raised.value.hint or "")


def test_ia3_output_scaling_is_refused_beside_a_bias_and_works_on_input() -> None:
    model = build("gpt_oss")
    with pytest.raises(PlanError, match="bias"):
        rewrite(model, "apply ia3 to *.experts.gate_up_proj")
    base = logits(model)
    rewrite(model, "apply ia3(on=input) to *.experts.gate_up_proj")
    assert torch.equal(logits(model), base)
    perturb(model)
    edited = logits(model)
    rewrite(model, "merge")
    torch.testing.assert_close(logits(model), edited, rtol=1e-5, atol=1e-5)


def test_ia3_then_lora_merge_order_is_kept_or_refused() -> None:
    model = build()
    rewrite(model, "apply ia3 to *.experts.down_proj\napply lora(r=2) to *.experts.down_proj")
    perturb(model)
    edited = logits(model)
    with pytest.raises(PlanError, match="do not commute"):
        rewrite(model, "merge lora")
    rewrite(model, "merge ia3")  # the first applied: exact
    torch.testing.assert_close(logits(model), edited, rtol=1e-5, atol=1e-5)


def test_streaming_merge_and_adapter_round_trip(tmp_path: Path) -> None:
    model = build("gpt_oss")  # its checkpoints keep the 3-D expert tensors
    model.save_pretrained(tmp_path / "base")
    rules = "apply lora(r=2) to *.experts.gate_up_proj[0, 2], *.experts.down_proj"
    report = rewrite(model, rules)
    perturb(model)
    write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=report.plan)
    fresh = build("gpt_oss")
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    rewrite(model, "merge")
    merged = model.state_dict()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            torch.testing.assert_close(f.get_tensor(key), merged[key], rtol=1e-6, atol=1e-6)


def test_streaming_merge_refuses_a_checkpoint_with_experts_split(tmp_path: Path) -> None:
    """Mixtral's checkpoints store each expert's w1/w2/w3 apart (transformers converts them on
    load): the streaming merge says it cannot find the 3-D tensor and writes nothing."""
    model = build()
    model.save_pretrained(tmp_path / "base")
    rules = "apply lora(r=2) to *.experts.gate_up_proj"
    report = rewrite(model, rules)
    write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=report.plan)
    with pytest.raises(ModelLoadError, match=r"has no tensor '.*experts\.gate_up_proj'"):
        merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_adapters_switch_and_routing_is_refused_by_name() -> None:
    model = build()
    base = logits(model)
    rewrite(model, "adapter a { apply lora(r=2) to *.experts.gate_up_proj }\n"
                   "adapter b { apply lora(r=2) to *.experts.gate_up_proj }")
    perturb(model)
    a = logits(model)  # the first adapter is the active one
    set_active(model, "b")
    b = logits(model)
    set_active(model, ())
    assert torch.equal(logits(model), base) and not torch.allclose(a, b)
    set_active(model, "a")
    with pytest.raises(RoutingError, match="gate_up_proj"):
        model(IDS, adapter_names=["a"])
    assert torch.equal(logits(model), a)


def test_lora_plus_ratio_reaches_param_groups() -> None:
    from surgery import param_groups

    model = build()
    rewrite(model, "apply lora(r=2, lr_ratio=16) to *.experts.gate_up_proj")
    groups = {g["lr_multiplier"]: g["param_names"] for g in param_groups(model, lr=1.0)}
    assert groups[16.0] == [f"{EXPERTS}.gate_up_proj.lora.B"]


def test_compiled_model_matches_eager() -> None:
    model = build()
    rewrite(model, "apply lora(r=2) to *.experts.gate_up_proj[0:2]")
    perturb(model)
    eager = logits(model)
    site = model.model.layers[0].mlp.experts
    assert isinstance(site, ParamSite)
    values = torch.compile(site.values, fullgraph=True)  # the edit's own part: one graph
    torch.testing.assert_close(values()["gate_up_proj"], site.values()["gate_up_proj"])
    with torch.no_grad():
        compiled = torch.compile(model)(IDS).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_family_roles_name_experts_and_routers(family: str) -> None:
    model = build(family)
    rules = "use auto\napply lora(r=2) to experts\napply ia3(on=input) to experts.down[0:2]"
    report = rewrite(model, rules + "\nunfreeze router")
    edits = [(t.path.rsplit(".", 1)[-1], t.role) for t in report.plan.edits]
    assert edits == [("gate_up_proj", "experts"), ("down_proj", "experts"),
                     ("down_proj", "experts.down")]
    router = sum(p.numel() for n, p in model.named_parameters() if ".mlp.router." in n
                 or ".mlp.gate." in n)
    assert report.trainable == 4 * 2 * (32 + 48) + 4 * 2 * (24 + 32) + 2 * 24 + router
