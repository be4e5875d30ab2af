"""Hypothesis property tests for the invariants of DESIGN.md ("Invariants the tests must hold").

Every property runs over random tiny Llama and Falcon configs (hidden 16-64, 1-3 layers, GQA for
Llama; multi-query, parallel attention and bias on or off for Falcon), random non-empty sets of
target projections written as selectors in many equivalent spellings (globs, `**`, anchors,
`<a,b>` alternation, layer indices and slices, `: Linear` filters), and random LoRA
hyperparameters (r within the layers' rank limit, alpha, rslora, init, dropout).

The test computes what each rule should select and what each statement should do on its own
(paths, shapes, scaling, trainable flags, counts); it does not reuse the library's planner.
"""

from __future__ import annotations

import copy
import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import FalconConfig, LlamaConfig

import surgery
from surgery import ExecutionError, Site, SurgeryError, rewrite
from surgery.lang import ast
from surgery.methods.lora import LoRA
from surgery.models import from_config

VOCAB = 37  # odd, like some real vocabularies: odd out_features for lm_head
IDS = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1234))

SLOW = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # no `explain` phase: it traces every line of torch and transformers, minutes per failure
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


def examples(n: int) -> settings:
    return settings(SLOW, max_examples=n)



# ---- architectures ------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Projections that every decoder layer holds in one container (`self_attn`, `mlp`)."""

    container: str
    names: tuple[str, ...]


class Arch:
    """A random tiny architecture (a plain class: Hypothesis prints it with `__repr__`)."""

    def __init__(
        self,
        family: str,
        config: Any,
        seed: int,
        layers_path: str,
        n_layers: int,
        groups: tuple[Group, ...],
    ):
        self.family, self.config, self.seed = family, config, seed
        self.layers_path, self.n_layers, self.groups = layers_path, n_layers, groups

    def build(self) -> nn.Module:
        return from_config(self.config, seed=self.seed)

    def __repr__(self) -> str:  # the config's own repr is 60 lines
        c = self.config
        keys = ["hidden_size", "num_hidden_layers", "num_attention_heads"]
        keys += (
            ["num_key_value_heads", "intermediate_size", "attention_bias", "mlp_bias"]
            if self.family == "llama"
            else ["multi_query", "parallel_attn", "bias", "tie_word_embeddings"]
        )
        shown = ", ".join(f"{k}={getattr(c, k)}" for k in keys)
        return f"Arch({self.family}, seed={self.seed}, {shown})"


LLAMA_GROUPS = (
    Group("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
    Group("mlp", ("gate_proj", "up_proj", "down_proj")),
)
FALCON_GROUPS = (
    Group("self_attention", ("query_key_value", "dense")),
    Group("mlp", ("dense_h_to_4h", "dense_4h_to_h")),
)


def _heads(draw: st.DrawFn) -> tuple[int, int]:
    """(number of heads, head dim) with an even head dim and hidden = heads * dim in 16..64."""
    head_dim = draw(st.sampled_from([2, 4, 8, 16]))
    heads = draw(st.sampled_from([h for h in range(1, 9) if 16 <= h * head_dim <= 64]))
    return heads, head_dim


@st.composite
def llama_archs(draw: st.DrawFn) -> Arch:
    heads, head_dim = _heads(draw)
    kv = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    layers = draw(st.integers(1, 3))
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        intermediate_size=draw(st.integers(8, 96)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32,
        attention_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        initializer_range=0.1,
    )
    seed = draw(st.integers(0, 2**16))
    return Arch("llama", config, seed, "model.layers", layers, LLAMA_GROUPS)


@st.composite
def falcon_archs(draw: st.DrawFn) -> Arch:
    heads, head_dim = _heads(draw)
    layers = draw(st.integers(1, 3))
    config = FalconConfig(
        vocab_size=VOCAB,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        multi_query=draw(st.booleans()),
        new_decoder_architecture=False,
        parallel_attn=draw(st.booleans()),
        bias=draw(st.booleans()),
        initializer_range=0.1,
    )
    seed = draw(st.integers(0, 2**16))
    return Arch("falcon", config, seed, "transformer.h", layers, FALCON_GROUPS)


ARCHS = st.one_of(llama_archs(), falcon_archs())


# ---- selectors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    text: str
    paths: frozenset[str]


def _render_names(draw: st.DrawFn, group: Group, names: list[str]) -> tuple[str, bool]:
    """The last segment for `names`, and whether it needs a `: Linear` filter."""
    if len(names) == len(group.names) and draw(st.booleans()):
        return "*", True  # containers also hold dropouts / activations
    if len(names) == 1 and draw(st.booleans()):
        return names[0], False
    if all(n.endswith("_proj") for n in names) and draw(st.booleans()):
        return "<" + ",".join(n.removesuffix("_proj") for n in names) + ">_proj", False
    return "<" + ",".join(names) + ">", False


@st.composite
def _index(draw: st.DrawFn, n: int) -> tuple[str, list[int]]:
    """An index list `[...]` over a module list of length n, and the indices it picks (each
    entry by one item only: an item that picks an entry again is an error)."""
    items: list[str] = []
    picked: list[int] = []
    for _ in range(draw(st.integers(1, 2))):
        if draw(st.booleans()):
            i = draw(st.integers(-n, n - 1))
            assume(list(range(n))[i] not in picked)
            items.append(str(i))
            picked.append(list(range(n))[i])
            continue
        bound = st.one_of(st.none(), st.integers(-n, n))
        start, stop = draw(bound), draw(bound)
        step = draw(st.sampled_from([None, 1, 2, -1]))
        chosen = list(range(n))[slice(start, stop, step)]
        assume(chosen and not set(chosen) & set(picked))
        text = f"{'' if start is None else start}:{'' if stop is None else stop}"
        if step is not None:
            text += f":{step}"
        items.append(text)
        picked += chosen
    return "[" + ", ".join(items) + "]", picked


@st.composite
def one_selector(draw: st.DrawFn, arch: Arch, lm_head: bool = True) -> Selection:
    group = draw(st.sampled_from([*arch.groups, None] if lm_head else arch.groups))
    if group is None:
        return Selection(
            draw(st.sampled_from(["lm_head", "^lm_head", "lm_head : Linear"])),
            frozenset({"lm_head"}),
        )
    names = draw(st.lists(st.sampled_from(group.names), min_size=1, unique=True))
    last, needs_filter = _render_names(draw, group, names)
    n = arch.n_layers
    every = list(range(n))
    form = draw(st.sampled_from(["star", "globstar", "anchored", "indexed", "tail-indexed"]))
    if form == "star":
        head, layers = "*", every
    elif form == "globstar":
        head, layers = "**", every
    elif form == "anchored":
        head, layers = f"^{arch.layers_path}.*", every
    else:
        index, layers = draw(_index(n))
        root = arch.layers_path if form == "indexed" else arch.layers_path.rsplit(".", 1)[1]
        head = root + index
    text = f"{head}.{group.container}.{last}"
    if needs_filter or draw(st.booleans()):
        text += draw(st.sampled_from([" : Linear", ": Linear", " :Linear"]))
    paths = {f"{arch.layers_path}.{i}.{group.container}.{name}" for i in layers for name in names}
    return Selection(text, frozenset(paths))


@st.composite
def selections(draw: st.DrawFn, arch: Arch, lm_head: bool = True) -> Selection:
    """One to three selectors joined by commas (they may overlap); the union of their paths."""
    parts = draw(st.lists(one_selector(arch, lm_head), min_size=1, max_size=3))
    return Selection(", ".join(p.text for p in parts), frozenset().union(*(p.paths for p in parts)))


def rank_limit(model: nn.Module, paths: frozenset[str]) -> int:
    return min(
        min(model.get_submodule(p).in_features, model.get_submodule(p).out_features) for p in paths
    )


# ---- LoRA arguments -----------------------------------------------------------------------


@dataclass(frozen=True)
class LoraCall:
    text: str  # lora(...)
    r: int
    scaling: float
    dropout: float


@st.composite
def lora_calls(draw: st.DrawFn, r_max: int, dropouts: tuple[float, ...] = (0.0,)) -> LoraCall:
    r = draw(st.integers(1, min(r_max, 8)))
    alpha = draw(st.one_of(st.integers(1, 64), st.floats(0.25, 64.0)))
    rslora = draw(st.booleans())
    init = draw(st.sampled_from(["kaiming", "gaussian"]))
    dropout = draw(st.sampled_from(dropouts))
    items = [f"r={r}"]
    if alpha != 8 or draw(st.booleans()):
        items.append(f"alpha={alpha!r}")
    if rslora or draw(st.booleans()):
        items.append(f"rslora={'true' if rslora else 'false'}")
    if init != "kaiming" or draw(st.booleans()):
        items.append(draw(st.sampled_from([f"init={init}", f'init="{init}"', f"init='{init}'"])))
    if dropout or draw(st.booleans()):
        items.append(f"dropout={dropout!r}")
    items = draw(st.permutations(items))
    trailing = draw(st.sampled_from(["", ","]))
    scaling = float(alpha) / (math.sqrt(r) if rslora else r)
    return LoraCall(f"lora({', '.join(items)}{trailing})", r, scaling, dropout)


@st.composite
def applications(
    draw: st.DrawFn,
    arch: Arch,
    model: nn.Module,
    name: str | None,
    dropouts: tuple[float, ...] = (0.0,),
    lm_head: bool = True,
) -> tuple[str, Selection, LoraCall]:
    """`apply lora(...) to SELECTORS [as NAME] [expect N]` with its selection and arguments."""
    selection = draw(selections(arch, lm_head))
    call = draw(lora_calls(rank_limit(model, selection.paths), dropouts))
    text = f"apply {call.text} to {selection.text}"
    if name is not None:
        text += f" as {name}"
    if draw(st.booleans()):
        text += f" expect {len(selection.paths)}"
    return text, selection, call


# ---- helpers ------------------------------------------------------------------------------


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False).logits.detach().clone()


def sites(model: nn.Module) -> dict[str, Site]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Site)}


def fill_adapters(model: nn.Module, seed: int, edit: str | None = None) -> None:
    """Random non-zero A and B in every adapter (or only in edit `edit`), delta of order 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in sites(model).values():
            for name in site.edit_names():
                if edit is not None and name != edit:
                    continue
                adapter = site.edit_module(name)
                r, n_in = adapter.A.shape
                a = torch.randn(adapter.A.shape, generator=gen) / math.sqrt(n_in)
                b = torch.randn(adapter.B.shape, generator=gen) * 0.3 / math.sqrt(r)
                adapter.A.copy_(torch.where(a == 0, 0.5, a))
                adapter.B.copy_(torch.where(b == 0, 0.5, b) / adapter.scaling)
                assert (adapter.A != 0).all() and (adapter.B != 0).all()


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    return {
        id(p)
        for site in sites(model).values()
        for name in site.edit_names()
        for p in site.edit_module(name).parameters()
    }


def logical_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by logical path: `q_proj.weight` for `q_proj.base.weight` under a site."""
    out: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        module, kept = model, []
        for part in parts[:-1]:
            if not (isinstance(module, Site) and part == "base"):
                kept.append(part)
            module = module._modules[part]
        out[".".join([*kept, parts[-1]])] = param
    return out


def real_counts(model: nn.Module) -> tuple[int, int]:
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@dataclass
class Snapshot:
    keys: list[str]
    values: dict[str, torch.Tensor]
    modules: list[tuple[str, nn.Module]]
    params: list[tuple[str, nn.Parameter, bool]]


def snapshot(model: nn.Module) -> Snapshot:
    state = model.state_dict()
    return Snapshot(
        list(state),
        {k: v.detach().clone() for k, v in state.items()},
        list(model.named_modules()),
        [(n, p, p.requires_grad) for n, p in model.named_parameters()],
    )


def assert_state_equal(model: nn.Module, snap: Snapshot, *, flags: bool = True) -> None:
    """Same state_dict bit for bit, same module objects, same Parameter objects (and flags)."""
    state = model.state_dict()
    assert list(state) == snap.keys
    for key, value in state.items():
        before = snap.values[key]
        assert value.dtype == before.dtype and torch.equal(value, before), key
    modules = list(model.named_modules())
    assert [n for n, _ in modules] == [n for n, _ in snap.modules]
    for (name, module), (_, old) in zip(modules, snap.modules, strict=True):
        assert module is old, f"{name} is a new object ({type(module).__name__})"
    params = list(model.named_parameters())
    assert [n for n, _ in params] == [n for n, _, _ in snap.params]
    for (name, param), (_, old, flag) in zip(params, snap.params, strict=True):
        assert param is old, name
        if flags:
            assert param.requires_grad == flag, name


def shares_weight(modules: list[tuple[str, nn.Module]], paths: frozenset[str]) -> bool:
    """Whether a target's weight is also held by another module (tied embeddings)."""
    holders: dict[int, set[str]] = {}
    for name, module in modules:
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(name)
    by_name = dict(modules)
    return any(len(holders[id(by_name[p].weight)]) > 1 for p in paths)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 tolerance, relative to the size of the logits."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


# ---- 1. zero-init equivalence ------------------------------------------------------------


@SLOW
@given(arch=ARCHS, data=st.data())
def test_zero_init_lora_leaves_logits_bit_identical(arch: Arch, data: st.DataObject) -> None:
    model = arch.build()
    before = logits(model)
    name = data.draw(st.sampled_from([None, "lora", "tune"]))
    text, selection, call = data.draw(applications(arch, model, name, dropouts=(0.0, 0.1, 0.5)))
    originals = {p: model.get_submodule(p) for p in selection.paths}
    edit = name or "lora"

    report = rewrite(model, text)

    wrapped = sites(model)
    assert set(wrapped) == selection.paths
    for path, site in wrapped.items():
        base = site.base
        assert base is originals[path]
        adapter = site.edit_module(edit)
        assert adapter.A.shape == (call.r, base.in_features)
        assert adapter.B.shape == (base.out_features, call.r)
        assert not adapter.B.any()
        assert adapter.A.any()
        assert math.isclose(adapter.scaling, call.scaling, rel_tol=1e-12)
    expected = {p: call.r * (m.in_features + m.out_features) for p, m in originals.items()}
    assert report.trainable == sum(expected.values())
    assert {t.path: t.params for t in report.plan.targets} == expected
    assert torch.equal(logits(model), before)


@examples(20)
@given(arch=ARCHS, data=st.data(), train=st.booleans())
def test_apply_keeps_the_training_mode(arch: Arch, data: st.DataObject, train: bool) -> None:
    """A model in eval mode stays in eval mode: no adapter (or its dropout) is left training."""
    model = arch.build().train(train)
    text, _, _ = data.draw(applications(arch, model, None, dropouts=(0.0, 0.1)))
    rewrite(model, text)
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes == dict.fromkeys(modes, train)


# ---- 2. merge correctness ----------------------------------------------------------------


@SLOW
@given(arch=ARCHS, data=st.data(), seed=st.integers(0, 2**16))
def test_merge_matches_unmerged_outputs(arch: Arch, data: st.DataObject, seed: int) -> None:
    model = arch.build()
    base_logits = logits(model)
    original_types = {n: type(m) for n, m in model.named_modules()}
    original_objects = dict(model.named_modules())
    weights0 = {k: v.clone() for k, v in model.state_dict().items()}
    total0 = real_counts(model)[1]
    text, selection, call = data.draw(applications(arch, model, None, dropouts=(0.0, 0.1, 0.5)))
    rewrite(model, text)
    fill_adapters(model, seed)
    deltas = {
        path: call.scaling * (s.lora.B.detach().double() @ s.lora.A.detach().double())
        for path, s in sites(model).items()
    }
    unmerged = logits(model)
    assert not torch.equal(unmerged, base_logits), "the filled adapters change nothing"
    assert torch.equal(logits(model), unmerged), "an eval-mode forward is not deterministic"
    before_merge = snapshot(model)

    try:
        report = rewrite(model, "merge")
    except SurgeryError:
        # Refusing is acceptable only where a merge could not be exact: a tied (shared) weight.
        assert shares_weight(list(original_objects.items()), selection.paths)
        assert_state_equal(model, before_merge)
        return

    assert not sites(model)
    assert {n: type(m) for n, m in model.named_modules()} == original_types
    for name, module in model.named_modules():
        assert module is original_objects[name], name
    assert report.trainable == 0 and report.total == total0
    state = model.state_dict()
    assert list(state) == list(weights0)
    for key, value in state.items():
        path, _, pname = key.rpartition(".")
        if path in selection.paths and pname == "weight":
            expected = weights0[key].double() + deltas[path]
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6 * scale)
        else:
            assert torch.equal(value, weights0[key]), f"{key} changed by the merge"
    assert_logits_close(logits(model), unmerged)


# ---- 3. remove exactness -----------------------------------------------------------------


@SLOW
@given(arch=ARCHS, data=st.data(), seed=st.integers(0, 2**16), fill=st.booleans())
def test_remove_restores_the_model_exactly(
    arch: Arch, data: st.DataObject, seed: int, fill: bool
) -> None:
    model = arch.build()
    before = logits(model)
    snap = snapshot(model)
    total0 = real_counts(model)[1]
    name = data.draw(st.sampled_from([None, "lora", "x1"]))
    text, _, _ = data.draw(applications(arch, model, name))
    rewrite(model, text)
    if fill:
        fill_adapters(model, seed)
    statement = data.draw(st.sampled_from(["remove", "remove lora", f"remove {name or 'lora'}"]))

    report = rewrite(model, statement)

    assert not sites(model)
    assert_state_equal(model, snap, flags=False)
    # apply froze the base; remove takes the adapters out and leaves the base frozen
    assert not any(p.requires_grad for p in model.parameters())
    assert (report.trainable, report.total) == (0, total0) == real_counts(model)
    assert torch.equal(logits(model), before)


# ---- 4. composition ----------------------------------------------------------------------


@SLOW
@given(
    arch=ARCHS,
    data=st.data(),
    seed=st.integers(0, 2**16),
    scenario=st.sampled_from(["remove a, b", "remove b, a", "remove", "merge a", "merge b"]),
    together=st.booleans(),
)
def test_two_named_loras_compose_and_come_apart(
    arch: Arch, data: st.DataObject, seed: int, scenario: str, together: bool
) -> None:
    model = arch.build()
    reference = copy.deepcopy(model)
    base_logits = logits(model)
    snap = snapshot(model)
    text_a, sel_a, call_a = data.draw(applications(arch, model, "a"))
    # overlap guaranteed: b also selects one of a's paths, by its full path
    shared = data.draw(st.sampled_from(sorted(sel_a.paths)))
    sel_b = data.draw(selections(arch))
    sel_b = Selection(f"{sel_b.text}, {shared}", sel_b.paths | {shared})
    call_b = data.draw(lora_calls(rank_limit(model, sel_b.paths)))
    rewrite(model, text_a)
    fill_adapters(model, seed, "a")
    with_a = logits(model)
    rewrite(model, f"apply {call_b.text} to {sel_b.text} as b")

    # zero-init equivalence also holds for a second LoRA stacked on a site
    assert torch.equal(logits(model), with_a)
    for path in sel_a.paths | sel_b.paths:
        site = model.get_submodule(path)
        expected = [e for e, sel in (("a", sel_a), ("b", sel_b)) if path in sel.paths]
        assert isinstance(site, Site) and site.edit_names() == expected, path
    fill_adapters(model, seed + 1, "b")
    adapters = {
        (path, e): site.edit_module(e)
        for path, site in sites(model).items()
        for e in site.edit_names()
    }

    removals = {"remove a, b": ["remove a", "remove b"], "remove b, a": ["remove b", "remove a"]}
    if scenario.startswith("remove"):
        statements = removals.get(scenario, ["remove"])
        if together:
            rewrite(model, "\n".join(statements))
        else:
            for statement in statements:
                rewrite(model, statement)
        assert not sites(model)
        assert_state_equal(model, snap, flags=False)
        assert torch.equal(logits(model), base_logits)
        return

    kept = scenario[-1]
    other = "b" if kept == "a" else "a"
    # the reference: the same model with only the kept LoRA, same weights, merged
    sel, call = (sel_a, call_a) if kept == "a" else (sel_b, call_b)
    rewrite(reference, f"apply {call.text} to {sel.text} as {kept}")
    with torch.no_grad():
        for path in sel.paths:
            mine, theirs = adapters[(path, kept)], reference.get_submodule(path).edit_module(kept)
            theirs.A.copy_(mine.A)
            theirs.B.copy_(mine.B)
    only_kept = logits(reference)
    try:
        rewrite(reference, f"merge {kept}")
        refused = False
    except SurgeryError:  # acceptable only for a tied weight, as in the merge property
        assert shares_weight(snap.modules, sel.paths)
        refused = True

    statements = data.draw(st.permutations([f"merge {kept}", f"remove {other}"]))
    for chunk in ["\n".join(statements)] if together else statements:
        if refused and "merge" in chunk:
            before = snapshot(model)
            with pytest.raises(SurgeryError):
                rewrite(model, chunk)
            assert_state_equal(model, before)
            return
        rewrite(model, chunk)
    assert not sites(model)
    original_objects = dict(snap.modules)
    for name, module in model.named_modules():
        assert module is original_objects[name], name
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    assert_logits_close(logits(model), only_kept)


# ---- 5. trainability and counts ----------------------------------------------------------


@dataclass
class _Entry:
    numel: int
    trainable: bool
    edit: str | None  # the adapter it belongs to


class FlagOracle:
    """What each statement should do to requires_grad, by logical parameter path."""

    def __init__(self, model: nn.Module):
        self.params = {
            n: _Entry(p.numel(), p.requires_grad, None)
            for n, p in logical_parameters(model).items()
        }
        self.dims = {
            n: (m.in_features, m.out_features)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear)
        }

    def apply(self, edit: str, paths: frozenset[str], r: int) -> None:
        for entry in self.params.values():
            if entry.edit is None:
                entry.trainable = False
        for path in sorted(paths):
            n_in, n_out = self.dims[path]
            self.params[f"{path}.{edit}.A"] = _Entry(r * n_in, True, edit)
            self.params[f"{path}.{edit}.B"] = _Entry(n_out * r, True, edit)

    def set(self, keep: Callable[[str, _Entry], bool], value: bool) -> None:
        for name, entry in self.params.items():
            if keep(name, entry):
                entry.trainable = value

    def remove(self, edit: str) -> None:
        self.params = {n: e for n, e in self.params.items() if e.edit != edit}

    def flags(self) -> dict[str, bool]:
        return {n: e.trainable for n, e in self.params.items()}

    def counts(self) -> tuple[int, int]:
        values = self.params.values()
        return sum(e.numel for e in values if e.trainable), sum(e.numel for e in values)


def _is_layernorm_param(name: str, entry: _Entry) -> bool:
    return entry.edit is None and name.rsplit(".", 2)[-2].endswith("layernorm")


@st.composite
def programs(draw: st.DrawFn, arch: Arch, model: nn.Module) -> tuple[list[str], FlagOracle]:
    oracle = FlagOracle(model)
    has_bias = any(n.endswith(".bias") for n in oracle.params)
    names = iter(["a", "b", "c", "d", "e", "f"])
    lines: list[str] = []
    live: list[str] = []

    def apply(name: str | None) -> None:
        text, selection, call = draw(applications(arch, model, name))
        edit = name or "lora"
        lines.append(text)
        live.append(edit)
        oracle.apply(edit, selection.paths, call.r)

    apply(draw(st.sampled_from([None, "lora", next(names)])))
    for _ in range(draw(st.integers(0, 5))):
        ops = ["freeze **", "unfreeze **", "unfreeze **.*layernorm"]
        if has_bias:
            ops.append("unfreeze **.bias")
        if len(live) < 3:
            ops.append("apply")
        for edit in live:
            ops += [f"freeze *.{edit}", f"unfreeze *.{edit}", f"remove {edit}"]
        op = draw(st.sampled_from(ops))
        if op == "apply":
            apply(next(names))
            continue
        lines.append(op)
        if op == "freeze **":
            oracle.set(lambda n, e: True, False)
        elif op == "unfreeze **":
            oracle.set(lambda n, e: True, True)
        elif op == "unfreeze **.*layernorm":
            oracle.set(_is_layernorm_param, True)
        elif op == "unfreeze **.bias":
            oracle.set(lambda n, e: n.endswith(".bias"), True)
        elif op.startswith("remove"):
            edit = op.split()[1]
            live.remove(edit)
            oracle.remove(edit)
        else:
            edit = op.split(".")[1]
            oracle.set(lambda n, e, edit=edit: e.edit == edit, op.startswith("unfreeze"))
    return lines, oracle


@SLOW
@given(arch=ARCHS, data=st.data())
def test_trainable_flags_and_counts_match_the_plan(arch: Arch, data: st.DataObject) -> None:
    model = arch.build()
    stepwise = copy.deepcopy(model)
    lines, oracle = data.draw(programs(arch, model))
    text = "\n".join(lines)
    untouched = snapshot(model)

    plan = rewrite(model, text, dry_run=True)

    assert_state_equal(model, untouched)  # a dry run changes nothing
    assert len(plan.steps) == len(lines)
    report = rewrite(model, text)
    actual = {n: p.requires_grad for n, p in logical_parameters(model).items()}
    assert actual == oracle.flags()
    assert (plan.trainable, plan.total) == oracle.counts() == real_counts(model)
    assert (report.trainable, report.total) == oracle.counts()

    # statement by statement: every step's counts are the real ones after that statement
    for i, (line, step) in enumerate(zip(lines, plan.steps, strict=True)):
        rewrite(stepwise, line)
        assert (step.trainable_after, step.total_after) == real_counts(stepwise), line
        if i == 0:  # after the first apply, exactly the adapter parameters train
            training = {id(p) for p in stepwise.parameters() if p.requires_grad}
            assert training == adapter_parameter_ids(stepwise)
            assert training
    final = {n: p.requires_grad for n, p in logical_parameters(stepwise).items()}
    assert final == actual


# ---- 6. parser totality ------------------------------------------------------------------

FRAGMENTS = [
    *("use", "let", "apply", "merge", "remove", "freeze", "unfreeze", "to", "as", "expect"),
    *("true", "false", "lora", "llama", "falcon", "Linear", "r", "alpha", "init", "gaussian"),
    *("*", "**", "^", ".", ",", ":", "::", "|", "=", "(", ")", "[", "]", "<", ">", "<>", "-"),
    *("*.self_attn", "<q,v>_proj", "<q,q>", "<a,,b>", "<q-v>", "a**b", "**[0]", "h[::0]"),
    *("layers[0:2]", "layers[-2:]", "[1,2,]", "[0, :, ::2]", "model.layers[0].mlp"),
    *("0", "-1", "+3", "1e5", ".5", "1.", "0x1", "1_000", "9" * 40, "7" * 4400, "1e999"),
    *('"rules.surg"', "'a\\'b'", '"unterminated', "'", '"', "\\", "#comment\n", "#"),
    *("\n", "\t", " ", "\r", "\x00", "é", "ℕ", "😀", "r=8", "alpha=16.0", "r=1, r=2"),
    *("apply lora(r=4) to *.self_attn.<q,v>_proj", "as a", "expect 8", "merge a"),
]


@st.composite
def fragment_texts(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=14))
    out = []
    for part in parts:
        out.append(part)
        out.append(draw(st.sampled_from(["", " ", "\n"])))
    return "".join(out)


# A generator that follows grammar/surgery.lark, with extreme terminals, so that whole programs
# parse and reach the tree -> AST builder (where most semantic checks of the parser live).

NAMES = st.one_of(
    st.sampled_from(["lora", "a", "x_1", "llama", "to", "as", "true", "apply", "Linear", "_"]),
    st.builds(
        str.__add__,
        st.sampled_from(string.ascii_letters + "_"),
        st.text(string.ascii_letters + string.digits + "_", max_size=6),
    ),
)
INTS = st.one_of(
    st.integers(-20, 20).map(str),
    st.integers().map(str),
    st.sampled_from(["+0", "-0", "007"]),
    st.sampled_from([40, 4300, 4301, 5000]).map(lambda n: "9" * n),  # very long numerals
)
FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False)
    .map(repr)
    .filter(lambda t: "e" in t or "." in t),
    st.sampled_from(["1.", ".5", "1e5", "-2.5e-3", "1e999", "1" * 400 + ".0"]),
)
STRINGS = st.one_of(
    st.sampled_from(['"rules.surg"', "'a\\'b'", '""', '"\\n"', "'é'"]),
    st.text(alphabet=st.characters(exclude_characters="\"'\\\n"), max_size=6).map(
        lambda t: f'"{t}"'
    ),
)
SEGMENT_TEXTS = st.one_of(
    NAMES,
    st.sampled_from(["*", "**", "*_proj", "q*", "<q,v>_proj", "<q>", "<a,b,a>", "<,>", "<a-b>"]),
    st.sampled_from(["<>", "a**", "**b", "<q, v>", "<ä>", "x<a,b>y<c,d>"]),
)


def _separated(draw: st.DrawFn, items: list[str], sep: str = ",") -> str:
    trailing = sep if items and draw(st.booleans()) else ""
    return sep.join(items) + trailing


@st.composite
def values(draw: st.DrawFn, depth: int = 0) -> str:
    leaf = st.one_of(INTS, FLOATS, STRINGS, NAMES, st.sampled_from(["true", "false"]))
    if depth >= 2 or draw(st.booleans()):
        return draw(leaf)
    if draw(st.integers(0, 20)) == 0:  # now and then, very deep nesting
        n = draw(st.sampled_from([50, 500, 5000]))
        return "[" * n + "]" * n
    items = draw(st.lists(values(depth + 1), max_size=3))
    return "[" + _separated(draw, items) + "]"


@st.composite
def index_items(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(INTS)
    parts = [draw(st.one_of(st.just(""), INTS)) for _ in range(draw(st.integers(2, 3)))]
    return ":".join(parts)


@st.composite
def grammar_selectors(draw: st.DrawFn) -> str:
    segments = []
    for _ in range(draw(st.integers(1, 4))):
        segment = draw(SEGMENT_TEXTS)
        if draw(st.integers(0, 3)) == 0:
            segment += "[" + ", ".join(draw(st.lists(index_items(), min_size=1, max_size=2))) + "]"
        segments.append(segment)
    text = ("^" if draw(st.booleans()) else "") + ".".join(segments)
    if draw(st.booleans()):
        text += " : " + " | ".join(draw(st.lists(NAMES, min_size=1, max_size=2)))
    return text


@st.composite
def statements(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["use", "let", "apply", "merge", "remove", "freeze", "unfreeze"]))
    selectors = ", ".join(draw(st.lists(grammar_selectors(), min_size=1, max_size=2)))
    if kind == "use":
        return "use " + draw(st.one_of(NAMES, STRINGS))
    if kind == "let":
        return f"let {'.'.join(draw(st.lists(NAMES, min_size=1, max_size=2)))} = {selectors}"
    if kind in ("merge", "remove"):
        return kind + (" " + draw(NAMES) if draw(st.booleans()) else "")
    if kind in ("freeze", "unfreeze"):
        return f"{kind} {selectors}"
    text = "apply " + draw(NAMES)
    if draw(st.booleans()):
        args = [f"{draw(NAMES)}={draw(values())}" for _ in range(draw(st.integers(0, 3)))]
        text += "(" + _separated(draw, args) + ")"
    text += " to " + selectors
    if draw(st.booleans()):
        text += " as " + draw(NAMES)
    if draw(st.booleans()):
        text += " expect " + draw(INTS)
    return text


@st.composite
def grammar_texts(draw: st.DrawFn) -> str:
    """Programs that follow the grammar; sometimes with one corruption (insert/delete/replace)."""
    separators = st.sampled_from(["\n", " ", "\n\n", "  # note\n", "\t"])
    text = ""
    for statement in draw(st.lists(statements(), min_size=1, max_size=4)):
        text += statement + draw(separators)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        text = (
            text[:at]
            + draw(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=2)))
            + (text[at + cut :])
        )
    return text


def _parses_or_reports(text: str) -> None:
    try:
        program = surgery.parse(text)
    except SurgeryError as error:
        event(f"raised {type(error).__name__}")
        rendered = str(error)  # rendering the message must not fail either
        assert isinstance(rendered, str) and rendered
        if error.span is not None:
            assert error.span.line >= 1 and error.span.column >= 1
        return
    except Exception as error:
        raise AssertionError(
            f"parse raised {type(error).__name__}, not a SurgeryError: {error}"
        ) from error
    event("parsed")
    assert isinstance(program, ast.Program)
    assert all(isinstance(s, ast.Statement) for s in program)


@examples(600)
@given(text=st.text(max_size=120))
def test_parser_is_total_on_arbitrary_text(text: str) -> None:
    _parses_or_reports(text)


@examples(500)
@given(text=fragment_texts())
def test_parser_is_total_on_grammar_fragments(text: str) -> None:
    _parses_or_reports(text)


@examples(300)
@given(text=grammar_texts())
def test_parser_is_total_on_grammar_programs(text: str) -> None:
    _parses_or_reports(text)


# ---- 7. transactional execution ----------------------------------------------------------


@SLOW
@given(
    arch=ARCHS,
    data=st.data(),
    seed=st.integers(0, 2**16),
    existing=st.booleans(),
    where=st.sampled_from(["build", "merged"]),
)
def test_failed_execution_restores_the_model(
    arch: Arch, data: st.DataObject, seed: int, existing: bool, where: str
) -> None:
    model = arch.build()
    # merging into a tied lm_head is the merge property's business (it may be refused)
    lm_head = not arch.config.tie_word_embeddings
    n_existing = 0
    if existing:  # a LoRA already in place, trained a little
        text_a, sel_a, _ = data.draw(applications(arch, model, "a", lm_head=lm_head))
        rewrite(model, text_a)
        fill_adapters(model, seed)
        n_existing = len(sel_a.paths)
    text_b, sel_b, _ = data.draw(applications(arch, model, "b", lm_head=lm_head))
    lines = [text_b]
    lines += data.draw(st.lists(st.sampled_from(["freeze **", "unfreeze *.b"]), max_size=2))
    merges = data.draw(
        st.sampled_from(["merge", "merge a", "merge a\nremove b"] if existing else ["merge"])
    )
    lines.append(merges)
    text = "\n".join(lines)
    n_merges = {"merge": n_existing + len(sel_b.paths)}.get(merges, n_existing)
    if where == "build":
        fail_at = data.draw(st.integers(1, len(sel_b.paths)))
    else:
        fail_at = data.draw(st.integers(1, n_merges))
    before = logits(model)
    snap = snapshot(model)

    calls = 0
    original = getattr(LoRA, where)

    def failing(self: LoRA, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if where == "build" and calls == fail_at:
            raise RuntimeError("injected failure")
        result = original(self, *args)
        if where == "merged" and calls == fail_at:  # earlier sites' weights are already written
            raise RuntimeError("injected failure")
        return result

    with mock.patch.object(LoRA, where, failing), pytest.raises(ExecutionError):
        rewrite(model, text)

    assert calls == fail_at
    assert_state_equal(model, snap)
    assert torch.equal(logits(model), before)
    # the program itself was valid: without the injected failure it runs
    rewrite(model, text)
    assert set(sites(model)) == (sel_b.paths if merges == "merge a" else set())
