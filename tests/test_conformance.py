"""Conformance of every method in the registry that lives on a module or a parameter (a new
method is covered on import; a method of a new placement must be tested or excused here).

For every ordered pair of methods on one module (site methods, on a Linear) or on one MoE expert
parameter (parameter methods, on overlapping subsets of a tiny Mixtral's experts) and every merge
subset: the merge is refused at plan time with the model bit-identical, or the merged model
computes what the unmerged one did (fp32, 1e-5 relative); the streaming checkpoint merge agrees.
For every method: identity at insertion, exact removal, and the save/load round trip. Adapters
are perturbed away from their identity initialization first, or the merge checks would prove
nothing. Model-level methods (virtual tokens) are excused by `EXCUSED`, with the reason.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from placement_cases import (
    EXPERTS,
    PARAMETER,
    assert_every_placement_decided,
    excused_cases,
    methods_of,
    moe,
    moe_logits,
    save_moe,
)
from safetensors import safe_open
from torch import nn

from surgery import PlanError, rewrite
from surgery.graph.logical import iter_edits
from surgery.graph.param_site import PARAM
from surgery.graph.placement import MODEL, SITE, Placement
from surgery.io import write_adapter_dir
from surgery.io.checkpoint import merge_checkpoint
from surgery.io.load import load_adapter
from surgery.methods import REGISTRY
from surgery.models import tiny
from surgery.plan import Plan

SIZE = 32
X = torch.randn(5, SIZE, generator=torch.Generator().manual_seed(0))
MERGES = ("merge a", "merge b", "merge a\nmerge b", "merge b\nmerge a", "merge")
HF_IDS = torch.arange(3, 19).unsqueeze(0)


class Probe(nn.Module):
    """One Linear that its parent calls; every site-level method attaches to it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(SIZE, SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


def probe() -> Probe:
    torch.manual_seed(0)
    return Probe().eval()


def llama_checkpoint(folder: Path) -> None:
    tiny("llama").save_pretrained(folder)


def moe_checkpoint(folder: Path) -> None:
    save_moe(moe(), folder)


@dataclass(frozen=True)
class Bench:
    """Where the methods of one placement are tried: a small model, the target every rule names,
    the module the method checks (and the arguments the planner adds for that target), its
    forward; the pair test's two targets; the model, targets and checkpoint of the streaming
    merge (a Hugging Face model)."""

    build: Callable[[], nn.Module]
    target: str
    owner: str
    run: Callable[[nn.Module], torch.Tensor]
    pair_targets: tuple[str, str]
    hf_build: Callable[[], nn.Module]
    hf_targets: tuple[str, str]
    hf_checkpoint: Callable[[Path], None]
    extra: dict[str, Any] = field(default_factory=dict)


SUB_A, SUB_B = f"{PARAMETER}[0:3]", f"{PARAMETER}[1, 2, 3]"  # experts 1 and 2 carry both edits
BENCHES: dict[Placement, Bench] = {
    SITE: Bench(probe, "proj", "proj", lambda m: m(X), ("proj", "proj"), lambda: tiny("llama"),
                ("model.layers.0.mlp.down_proj",) * 2, llama_checkpoint),
    PARAM: Bench(moe, PARAMETER, EXPERTS, moe_logits, (SUB_A, SUB_B), moe, (SUB_A, SUB_B),
                 moe_checkpoint, {"parameter": "gate_up_proj", "experts": None}),
}
EXCUSED = {
    MODEL: "virtual tokens sit on the model, not on a module or a parameter: no target for a "
    "pair to share, and `merge` bakes them into a table that stays (or is refused) instead of "
    "folding them into base tensors; their own suites are tests/test_prompts.py and "
    "tests/test_virtual_tokens_hf524.py",
}


def test_every_placement_is_tested_or_excused() -> None:
    assert_every_placement_decided(BENCHES, EXCUSED)


@pytest.mark.parametrize(("method", "reason"), excused_cases(EXCUSED))
def test_methods_of_excused_placements(method: str, reason: str) -> None:
    pytest.skip(f"{method}: {reason}")


def bench_of(spec: str) -> Bench:
    return BENCHES[REGISTRY[spec.partition("(")[0]].placement]


def _spelled(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _owner(bench: Bench) -> nn.Module:
    return bench.build().get_submodule(bench.owner)


def variants() -> list[str]:
    """Each method of a tested placement with its defaults, plus each other choice of a
    parameter that changes its edit's options (ia3's `on=input`, the adapters' activations). A
    method that cannot attach to its bench's target with its defaults (its own `check_target`
    says why) is left out: see `UNFIT`."""
    found: list[str] = []
    for placement, bench in BENCHES.items():
        module = _owner(bench)
        for name in methods_of(placement):
            method = REGISTRY[name]
            defaults = {p.name: p.default for p in method.params} | bench.extra
            if method.check_target(module, defaults) is not None:
                continue
            seen = {method.edit_key("e", module, defaults).options}
            found.append(name)
            for param in method.params:
                for choice in param.choices or ():
                    args = {**defaults, param.name: choice}
                    if method.check_target(module, args) is not None:
                        continue
                    options = method.edit_key("e", module, args).options
                    if options not in seen:
                        seen.add(options)
                        found.append(f"{name}({param.name}={_spelled(choice)})")
    return found


VARIANTS = variants()
# methods their bench does not fit, with their own reason (covered by their own tests:
# trainable_tokens in tests/test_tokens_and_copies.py)
UNFIT = {
    name: problem.message
    for placement, bench in BENCHES.items()
    for name in methods_of(placement)
    if (problem := REGISTRY[name].check_target(
        _owner(bench), {p.name: p.default for p in REGISTRY[name].params} | bench.extra))
}


@pytest.mark.parametrize("method", sorted(UNFIT))
def test_methods_the_probe_does_not_fit(method: str) -> None:
    pytest.skip(f"{method} cannot attach to its bench's target: {UNFIT[method]}")


# pairs of methods of one placement (methods of two placements never share a target)
PAIRS = [(a, b) for a, b in itertools.product(VARIANTS, repeat=2) if bench_of(a) is bench_of(b)]


def mergeable(spec: str) -> bool:
    """Whether the planner's predicate (`Method.can_merge`) takes an edit of this variant."""
    name, _, choice = spec.partition("(")
    method, bench = REGISTRY[name], bench_of(spec)
    args = {p.name: p.default for p in method.params} | bench.extra
    if choice:
        param, _, value = choice.rstrip(")").partition("=")
        choices = next(p.choices or () for p in method.params if p.name == param)
        args[param] = next(c for c in choices if _spelled(c) == value)
    return method.can_merge(dict(method.edit_key("e", _owner(bench), args).options))


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every trainable (adapter) tensor away from its identity initialization."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, [(name, type(m)) for name, m in model.named_modules()]


def assert_same(model: nn.Module, before: tuple[dict[str, torch.Tensor], list]) -> None:
    state, types = snapshot(model)
    assert types == before[1]
    assert list(state) == list(before[0])
    assert all(torch.equal(state[k], before[0][k]) for k in state)


def assert_merged_close(merged: torch.Tensor, unmerged: torch.Tensor) -> None:
    scale = float(unmerged.abs().max())
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def edit_names(model: nn.Module) -> set[str]:
    return {name for _, name, _ in iter_edits(model)}


def apply_pair(
    model: nn.Module, first: str, second: str, targets: tuple[str, str]
) -> tuple[str, Plan]:
    """Apply `first` as edit a, then `second` as edit b, to `targets`; the rules and the plan."""
    rules = f"apply {first} to {targets[0]} as a\napply {second} to {targets[1]} as b"
    return rules, rewrite(model, rules).plan


@pytest.mark.parametrize("spec", VARIANTS)
def test_identity_exact_remove_and_load_round_trip(spec: str, tmp_path: Path) -> None:
    bench = bench_of(spec)
    model = bench.build()
    before = snapshot(model)
    with torch.no_grad():
        reference = bench.run(model)
        rules = f"apply {spec} to {bench.target}"
        report = rewrite(model, rules)
        assert torch.equal(bench.run(model), reference)  # identity at insertion, bit for bit
        perturb(model)
        adapted = bench.run(model)
        assert not torch.equal(adapted, reference)
        write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=report.plan)
        fresh = bench.build()
        load_adapter(fresh, tmp_path / "adapter")
        assert torch.equal(bench.run(fresh), adapted)
    rewrite(model, "remove")
    assert_same(model, before)


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_every_merge_of_a_pair_is_exact_or_refused(first: str, second: str) -> None:
    bench = bench_of(first)
    model = bench.build()
    before = snapshot(model)
    try:
        apply_pair(model, first, second, bench.pair_targets)
    except PlanError:
        assert_same(model, before)  # the pair cannot share a module: refused, nothing changed
        return
    perturb(model)
    with torch.no_grad():
        unmerged = bench.run(model)
    for program in MERGES:
        trial = copy.deepcopy(model)
        state = snapshot(trial)
        try:
            rewrite(trial, program)
        except PlanError:
            assert_same(trial, state)
            continue
        with torch.no_grad():
            assert_merged_close(bench.run(trial), unmerged)
        merged = {"a", "b"} if program == "merge" else {w[-1] for w in program.split("\n")}
        assert edit_names(trial) == {"a", "b"} - merged


# pairs the planner must merge in full (the pair test allows refusals: not the easy way out)
MERGED_PAIRS = {
    SITE: [("lora", "sparse"), ("sparse", "ia3"), ("dora", "lora")],
    PARAM: [("lora_experts", "lora_experts"), ("lora_experts", "ia3_experts"),
            ("ia3_experts", "ia3_experts(on=input)")],
}


def test_each_mergeable_method_merges_alone_and_pairs_are_not_all_refused() -> None:
    assert set(MERGED_PAIRS) == set(BENCHES)
    for spec in filter(mergeable, VARIANTS):
        bench = bench_of(spec)
        model = bench.build()
        plain = type(model.get_submodule(bench.owner))
        rewrite(model, f"apply {spec} to {bench.target}")
        perturb(model)
        with torch.no_grad():
            unmerged = bench.run(model)
            rewrite(model, "merge")
            assert_merged_close(bench.run(model), unmerged)
        assert type(model.get_submodule(bench.owner)) is plain
    for placement, pairs in MERGED_PAIRS.items():
        bench = BENCHES[placement]
        for first, second in pairs:
            model = bench.build()
            apply_pair(model, first, second, bench.pair_targets)
            rewrite(model, "merge")  # accepted
            assert not edit_names(model)


# ---- the streaming checkpoint merge ------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[Placement, Path]:
    """Each bench's base checkpoint, written once."""
    found = {}
    for placement, bench in BENCHES.items():
        found[placement] = tmp_path_factory.mktemp("base") / "model"
        bench.hf_checkpoint(found[placement])
    return found


MERGEABLE_PAIRS = [(a, b) for a, b in PAIRS if mergeable(a) and mergeable(b)]


@pytest.mark.parametrize(
    ("first", "second"), MERGEABLE_PAIRS, ids=[f"{a}+{b}" for a, b in MERGEABLE_PAIRS]
)
def test_streaming_merge_agrees_with_the_in_memory_merge(
    first: str, second: str, checkpoints: dict[Placement, Path], tmp_path: Path
) -> None:
    bench = bench_of(first)
    checkpoint = checkpoints[REGISTRY[first.partition("(")[0]].placement]
    model = bench.hf_build()
    try:
        rules, plan = apply_pair(model, first, second, bench.hf_targets)
    except PlanError:
        return  # refused at apply: covered by the pair test
    perturb(model)
    write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=plan)
    out = tmp_path / "out"
    with torch.no_grad():
        unmerged = model(HF_IDS).logits
    try:
        rewrite(model, "merge")
    except PlanError:
        with pytest.raises(PlanError, match="would differ from the unmerged"):
            merge_checkpoint(checkpoint, tmp_path / "adapter", out, progress=False)
        assert not out.exists()
        return
    with torch.no_grad():
        assert_merged_close(model(HF_IDS).logits, unmerged)
    merge_checkpoint(checkpoint, tmp_path / "adapter", out, progress=False)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        streamed = {k: f.get_tensor(k) for k in f.keys()}
    merged = model.state_dict()
    assert set(streamed) <= set(merged)
    for key, tensor in streamed.items():
        torch.testing.assert_close(tensor, merged[key], rtol=1e-6, atol=1e-6)
