"""Conformance of every site-level method in the registry (a new method is covered on import).

For every ordered pair of methods on one module and every merge subset: the merge is refused at
plan time with the model bit-identical, or the merged model computes what the unmerged one did
(fp32, 1e-5 relative); the streaming checkpoint merge agrees. For every method: identity at
insertion, exact removal, and the save/load round trip. Adapters are perturbed away from their
identity initialization first, or the merge checks would prove nothing.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

from surgery import PlanError, rewrite
from surgery.io import write_adapter_dir
from surgery.io.checkpoint import merge_checkpoint
from surgery.io.load import load_adapter
from surgery.methods import REGISTRY, SiteMethod
from surgery.models import tiny
from surgery.plan import Plan

SIZE = 32
X = torch.randn(5, SIZE, generator=torch.Generator().manual_seed(0))
MERGES = ("merge a", "merge b", "merge a\nmerge b", "merge b\nmerge a", "merge")
HF_TARGET = "model.layers.0.mlp.down_proj"
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


def _spelled(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def variants() -> list[str]:
    """Each site-level method with its defaults, plus each other choice of a parameter that
    changes the site graph (ia3's `on=input`, the adapters' activations). A method that cannot
    attach to the probe's Linear with its defaults (its own `check_target` says why) is left
    out: see `UNFIT`."""
    found: list[str] = []
    module = probe().proj
    for name, method in sorted(REGISTRY.items()):
        if not isinstance(method, SiteMethod):
            continue
        defaults = {p.name: p.default for p in method.params}
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
# site-level methods the probe does not fit, with their own reason (covered by their own tests:
# trainable_tokens in tests/test_tokens_and_copies.py)
UNFIT = {
    name: problem.message
    for name, method in sorted(REGISTRY.items())
    if isinstance(method, SiteMethod)
    and (problem := method.check_target(probe().proj, {p.name: p.default for p in method.params}))
}


@pytest.mark.parametrize("method", sorted(UNFIT))
def test_methods_the_probe_does_not_fit(method: str) -> None:
    pytest.skip(f"{method} cannot attach to the probe's Linear: {UNFIT[method]}")
PAIRS = list(itertools.product(VARIANTS, repeat=2))


def mergeable(spec: str) -> bool:
    """Whether the planner's predicate (`Method.can_merge`) takes an edit of this variant."""
    name, _, choice = spec.partition("(")
    method = REGISTRY[name]
    args = {p.name: p.default for p in method.params}
    if choice:
        param, _, value = choice.rstrip(")").partition("=")
        choices = next(p.choices or () for p in method.params if p.name == param)
        args[param] = next(c for c in choices if _spelled(c) == value)
    return method.can_merge(dict(method.edit_key("e", probe().proj, args).options))


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


def apply_pair(model: nn.Module, first: str, second: str, target: str) -> tuple[str, Plan]:
    """Apply `first` as edit a, then `second` as edit b, to `target`; the rules and the plan."""
    rules = f"apply {first} to {target} as a\napply {second} to {target} as b"
    return rules, rewrite(model, rules).plan


@pytest.mark.parametrize("spec", VARIANTS)
def test_identity_exact_remove_and_load_round_trip(spec: str, tmp_path: Path) -> None:
    model = probe()
    before = snapshot(model)
    with torch.no_grad():
        reference = model(X)
        rules = f"apply {spec} to proj"
        report = rewrite(model, rules)
        assert torch.equal(model(X), reference)  # identity at insertion, bit for bit
        perturb(model)
        adapted = model(X)
        assert not torch.equal(adapted, reference)
        write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=report.plan)
        fresh = probe()
        load_adapter(fresh, tmp_path / "adapter")
        assert torch.equal(fresh(X), adapted)
    rewrite(model, "remove")
    assert_same(model, before)


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
def test_every_merge_of_a_pair_is_exact_or_refused(first: str, second: str) -> None:
    model = probe()
    before = snapshot(model)
    try:
        apply_pair(model, first, second, "proj")
    except PlanError:
        assert_same(model, before)  # the pair cannot share a module: refused, nothing changed
        return
    perturb(model)
    with torch.no_grad():
        unmerged = model(X)
    for program in MERGES:
        trial = copy.deepcopy(model)
        state = snapshot(trial)
        try:
            rewrite(trial, program)
        except PlanError:
            assert_same(trial, state)
            continue
        with torch.no_grad():
            assert_merged_close(trial(X), unmerged)
        assert {"a", "b"}.isdisjoint(name for name, _ in trial.named_children())


def test_each_mergeable_method_merges_alone_and_pairs_are_not_all_refused() -> None:
    """The pair test allows refusals: make sure they are not the easy way out."""
    for spec in filter(mergeable, VARIANTS):
        model = probe()
        rewrite(model, f"apply {spec} to proj")
        perturb(model)
        with torch.no_grad():
            unmerged = model(X)
            rewrite(model, "merge")
            assert_merged_close(model(X), unmerged)
        assert type(model.proj) is nn.Linear
    for first, second in [("lora", "sparse"), ("sparse", "ia3"), ("dora", "lora")]:
        model = probe()
        apply_pair(model, first, second, "proj")
        rewrite(model, "merge")  # accepted


# ---- the streaming checkpoint merge ------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "model"
    tiny("llama").save_pretrained(folder)
    return folder


MERGEABLE_PAIRS = [(a, b) for a, b in PAIRS if mergeable(a) and mergeable(b)]


@pytest.mark.parametrize(
    ("first", "second"), MERGEABLE_PAIRS, ids=[f"{a}+{b}" for a, b in MERGEABLE_PAIRS]
)
def test_streaming_merge_agrees_with_the_in_memory_merge(
    first: str, second: str, checkpoint: Path, tmp_path: Path
) -> None:
    model = tiny("llama")
    try:
        rules, plan = apply_pair(model, first, second, HF_TARGET)
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
