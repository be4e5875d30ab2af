"""Hypothesis property tests of DESIGN.md's invariants for every parameter method (edits on MoE
expert parameters), the counterpart of tests/test_properties.py (which draws LoRA on Llama and
Falcon modules).

Random tiny Mixtral configs (hidden 4-32, intermediate 4-12, 2-4 experts, top-k, 1-2 layers) and
random programs of 1-3 parameter edits (every registered parameter method, by its registered name
or by the name a rule writes, random arguments, either expert parameter, all experts or a random
subset in any order): identity at insertion (bit for bit); the counts the test computes itself
from the shapes are the plan's and the real ones, only the edits' tensors train; a rank over the
limit is refused with the model unchanged; only the chosen experts' weights change; a merge of any
subset of the edits is exact (fp32, 1e-5) or refused with the model unchanged, a merge of all of
them is never refused; remove restores the state dict and module classes bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from placement_cases import methods_of
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from surgery import ExecutionError, PlanError, rewrite
from surgery.graph.param_site import PARAM, ParamSite
from surgery.methods import REGISTRY
from surgery.methods.experts import PARAMETER_FORMS

IDS = torch.arange(1, 13).reshape(2, 6)
RULE_NAMES = {form: name for name, form in PARAMETER_FORMS.items()}  # lora_experts -> lora

# Per parameter method: its arguments as rule text, and its trainable count on one parameter
# (chosen experts, in, out features, the drawn arguments). A method missing here fails
# `test_every_parameter_method_has_a_strategy`.
ARGUMENTS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "lora_experts": st.fixed_dictionaries({
        "r": st.integers(1, 10),
        "alpha": st.sampled_from([1, 4, 16]),
        "rslora": st.booleans(),
        "init": st.sampled_from(["kaiming", "gaussian"]),
    }),
    "ia3_experts": st.fixed_dictionaries({"on": st.sampled_from(["output", "input"])}),
}
COUNTS: dict[str, Callable[[int, int, int, dict[str, Any]], int]] = {
    "lora_experts": lambda experts, n_in, n_out, args: experts * args["r"] * (n_in + n_out),
    "ia3_experts": lambda experts, n_in, n_out, args: experts
    * (n_out if args["on"] == "output" else n_in),
}
# arguments outside the method's limits on this parameter: the expected refusal
REFUSED: dict[str, Callable[[int, int, dict[str, Any]], bool]] = {
    "lora_experts": lambda n_in, n_out, args: args["r"] > min(n_in, n_out),
    "ia3_experts": lambda n_in, n_out, args: False,  # Mixtral's experts have no biases
}
PROPERTIES = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_every_parameter_method_has_a_strategy() -> None:
    for table in (ARGUMENTS, COUNTS, REFUSED):
        assert set(table) == set(methods_of(PARAM))


@st.composite
def mixtrals(draw: st.DrawFn) -> tuple[MixtralConfig, int]:
    heads = draw(st.sampled_from([1, 2, 4]))
    experts = draw(st.integers(2, 4))
    config = MixtralConfig(
        vocab_size=16, hidden_size=heads * draw(st.sampled_from([4, 8])),
        # sizes in multiples of 4 floats: transformers' grouped_mm needs 16-byte rows
        intermediate_size=draw(st.sampled_from([4, 8, 12])),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from([1, heads])),
        num_local_experts=experts, num_experts_per_tok=draw(st.integers(1, experts)),
        max_position_embeddings=16,
    )
    return config, draw(st.integers(0, 2**16))


def build(config: MixtralConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(std=1.0)  # routing that reaches every expert
    return model


@st.composite
def statements(draw: st.DrawFn, config: MixtralConfig, prefix: str = "e") -> list[dict[str, Any]]:
    """1-3 edits (named prefix0, prefix1, ...): method, arguments, parameter, chosen experts
    (None: all) and the rule line."""
    found = []
    for i in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from(methods_of(PARAM)))
        args = draw(ARGUMENTS[method])
        parameter = draw(st.sampled_from(["gate_up_proj", "down_proj"]))
        experts = None
        index = ""
        if draw(st.booleans()):
            n = config.num_local_experts
            experts = draw(st.permutations(list(range(n))))[: draw(st.integers(1, n))]
            spelled = [str(e - n) if draw(st.booleans()) else str(e) for e in experts]
            index = f"[{', '.join(spelled)}]"
        name = draw(st.sampled_from([method, RULE_NAMES.get(method, method)]))
        written = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                            for k, v in args.items())
        line = f"apply {name}({written}) to *.mlp.experts.{parameter}{index} as {prefix}{i}"
        found.append(dict(method=method, args=args, parameter=parameter, experts=experts,
                          line=line))
    return found


def sides(config: MixtralConfig, parameter: str) -> tuple[int, int]:
    """(in, out) features of one expert's matrix."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return (hidden, 2 * inner) if parameter == "gate_up_proj" else (inner, hidden)


def over_limits(config: MixtralConfig) -> Callable[[dict[str, Any]], bool]:
    return lambda e: REFUSED[e["method"]](*sides(config, e["parameter"]), e["args"])


def perturb(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, type]]]:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()])


def assert_same(model: nn.Module, before: tuple[dict[str, torch.Tensor], list]) -> None:
    tensors, types = state(model)
    assert types == before[1] and list(tensors) == list(before[0])
    assert all(torch.equal(tensors[k], before[0][k]) for k in tensors)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@PROPERTIES
@given(drawn=mixtrals(), data=st.data())
def test_parameter_edits_keep_every_invariant(drawn: tuple, data: st.DataObject) -> None:
    config, seed = drawn
    model = build(config, seed)
    before, base = state(model), logits(model)
    edits = data.draw(statements(config), label="edits")
    program = "\n".join(e["line"] for e in edits)
    if any(map(over_limits(config), edits)):
        try:
            rewrite(model, program)
        except PlanError:
            assert_same(model, before)
            return
        raise AssertionError("an edit over its method's limits was accepted")

    report = rewrite(model, program)

    assert torch.equal(logits(model), base)  # identity at insertion
    layers = config.num_hidden_layers
    expected = sum(
        layers * COUNTS[e["method"]](
            config.num_local_experts if e["experts"] is None else len(e["experts"]),
            *sides(config, e["parameter"]), e["args"])
        for e in edits
    )
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert report.trainable == expected == sum(p.numel() for p in trainable.values())
    assert all(".mlp.experts." in n and n.split(".")[-2].startswith("e") for n in trainable)

    perturb(model, seed)
    edited = logits(model)
    for layer in model.model.layers:  # only the chosen experts' weights change
        site = layer.mlp.experts
        assert isinstance(site, ParamSite)
        values = site.values()
        for parameter, value in values.items():
            chosen: set[int] = set()
            for e in (e for e in edits if e["parameter"] == parameter):
                chosen |= set(range(config.num_local_experts) if e["experts"] is None
                              else e["experts"])
            original = site.base._parameters[parameter]
            for expert in range(config.num_local_experts):
                same = torch.equal(value[expert], original[expert])
                assert same == (expert not in chosen), (parameter, expert)

    merged_names = data.draw(st.sets(st.sampled_from([f"e{i}" for i in range(len(edits))])))
    merge = "\n".join(f"merge {n}" for n in sorted(merged_names)) or "merge"
    trial = copy.deepcopy(model)
    kept = state(trial)
    try:
        rewrite(trial, merge)
    except PlanError:
        assert merge != "merge", "merging every edit must be exact, never refused"
        assert_same(trial, kept)
    else:
        scale = max(1.0, float(edited.abs().max()))
        torch.testing.assert_close(logits(trial), edited, rtol=1e-5, atol=1e-5 * scale)

    rewrite(model, "remove")
    assert_same(model, before)


@PROPERTIES
@given(drawn=mixtrals(), data=st.data(), where=st.sampled_from(["build", "merged"]))
def test_a_failed_execution_restores_the_model(
    drawn: tuple, data: st.DataObject, where: str
) -> None:
    """Edits already in place (trained a little), then a program that adds edits and merges
    them all; a failure injected at any build or merge leaves the model as it was."""
    config, seed = drawn
    model = build(config, seed)
    first = data.draw(statements(config, "a"), label="first")
    second = data.draw(statements(config, "b"), label="second")
    assume(not any(map(over_limits(config), first + second)))
    rewrite(model, "\n".join(e["line"] for e in first))
    perturb(model, seed)
    program = "\n".join([*(e["line"] for e in second), "merge"])
    calls = len(second if where == "build" else first + second) * config.num_hidden_layers
    fail_at = data.draw(st.integers(1, calls), label="fail_at")
    before, expected = state(model), logits(model)
    count = 0

    def failing(original: Callable) -> Callable:
        def call(self: Any, *args: Any) -> Any:
            nonlocal count
            count += 1
            result = original(self, *args)
            if count == fail_at:  # a merge's earlier results are written by now
                raise RuntimeError("injected failure")
            return result
        return call

    with ExitStack() as patches:
        for name in methods_of(PARAM):
            cls = type(REGISTRY[name])
            patches.enter_context(mock.patch.object(cls, where, failing(getattr(cls, where))))
        try:
            rewrite(model, program)
        except ExecutionError:
            pass
        else:
            raise AssertionError("the injected failure was not raised")
    assert count == fail_at
    assert_same(model, before)
    assert torch.equal(logits(model), expected)
    rewrite(model, program)  # the program itself is valid
    assert not any(isinstance(m, ParamSite) for m in model.modules())
