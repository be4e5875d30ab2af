"""The life cycle of named adapters: per-adapter counts in the plan, the public API (activate,
disable, delete, merge one) and the trainability policy (set_active leaves requires_grad alone;
an inactive adapter gets no gradient, so an optimizer leaves it bit for bit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import surgery
from surgery import (
    ExecutionError,
    PlanError,
    SurgeryError,
    active_adapters,
    adapter_names,
    delete_adapter,
    disabled,
    merge_adapter,
    rewrite,
    set_active,
)
from surgery.adapters.units import unit_edits
from surgery.cli import main
from surgery.execute import count_parameters
from surgery.graph.placement import SITE
from surgery.models import tiny

IDS = torch.arange(3, 15).unsqueeze(0)
QV = "*.self_attn.<q,v>_proj"
TWO = (
    f"adapter sql {{ apply lora(r=4) to {QV} }}\n"
    f"adapter chat {{ apply lora(r=4) to {QV}\n  apply ia3 to *.mlp.down_proj }}"
)


def fill(model: nn.Module, seed: int) -> None:
    """Random values in every trainable tensor, so each adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.fixture
def two() -> nn.Module:
    """tiny-llama with adapters `sql` (active) and `chat` (inactive), random weights."""
    model = tiny("llama")
    rewrite(model, TWO)
    fill(model, 1)
    return model


# ---- 1. per-adapter counts --------------------------------------------------------------------


def unit_counts(model: nn.Module, name: str) -> tuple[int, int, int]:
    """(edits, parameters, trainable) of adapter `name` as the model holds it."""
    held = unit_edits(model, name)
    params = {id(p): p for _, _, module in held for p in module.parameters()}.values()
    return (
        len(held),
        sum(p.numel() for p in params),
        sum(p.numel() for p in params if p.requires_grad),
    )


def test_plan_counts_each_adapter_as_the_model_holds_it() -> None:
    model = tiny("llama")
    rules = TWO + "\nfreeze *.self_attn.q_proj.sql"  # some of sql does not train
    plan = surgery.plan(model, rules)
    counts = plan.adapters()
    assert list(counts) == ["sql", "chat"]
    report = rewrite(model, rules)
    for name, planned in counts.items():
        assert (planned.edits, planned.params, planned.trainable) == unit_counts(model, name)
    assert counts["sql"].trainable < counts["sql"].params  # the freeze counted
    trainable, total = count_parameters(model)
    assert sum(c.trainable for c in counts.values()) == trainable == plan.trainable
    assert total == plan.total
    for text in (str(plan), str(report)):
        assert "adapter sql: 8 edit(s), 3,584 params (1,536 trainable)" in text
        assert "adapter chat: 12 edit(s), 3,840 params (3,840 trainable)" in text
    # after a later rewrite the plan counts the adapters the model already had
    later = surgery.plan(model, "remove chat")
    assert list(later.adapters()) == ["sql"]
    assert later.adapters()["sql"].trainable == counts["sql"].trainable


def test_a_plan_of_default_edits_prints_no_adapter_lines() -> None:
    plan = surgery.plan(tiny("llama"), f"apply lora(r=4) to {QV}")
    assert list(plan.adapters()) == ["default"]
    assert "adapter " not in str(plan)


def test_cli_plan_shows_the_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "-e", TWO, "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "adapters" in out
    rows = {
        line.split()[1]: line.split()[3:8:2]
        for line in out.splitlines()
        if line.startswith("│ sql") or line.startswith("│ chat")
    }
    assert rows == {"sql": ["8", "3,584", "3,584"], "chat": ["12", "3,840", "3,840"]}


# ---- 2. the public API ------------------------------------------------------------------------


def test_activate_one_several_or_none(two: nn.Module) -> None:
    assert adapter_names(two) == ["sql", "chat"] and active_adapters(two) == ("sql",)
    sql = logits(two)
    set_active(two, "chat")
    chat = logits(two)
    set_active(two, ())
    base = logits(two)
    set_active(two, ["chat", "sql"])
    assert active_adapters(two) == ("sql", "chat")  # in the order they were added
    both = logits(two)
    assert not torch.allclose(sql, chat) and not torch.allclose(sql, base)
    # both active: the sum of their edits, as one adapter holding all of them computes it
    reference = tiny("llama")
    rewrite(
        reference,
        f"apply lora(r=4) to {QV} as sql\napply lora(r=4) to {QV} as chat\n"
        "apply ia3 to *.mlp.down_proj as chat",
    )
    reference.load_state_dict(two.state_dict())
    assert torch.equal(logits(reference), both)
    torch.testing.assert_close(base, logits(tiny("llama")), rtol=0, atol=0)
    with pytest.raises(SurgeryError, match=r"no adapter named 'sq'.*sql, chat"):
        set_active(two, "sq")


def test_disabled_is_the_base_model_and_gradients_still_flow_outside(two: nn.Module) -> None:
    """DPO's reference log-probabilities: inside `disabled` the model is the base model; a loss
    computed partly outside still trains the active adapter, through the outside part only."""
    base = tiny("llama")
    with torch.no_grad():
        expected = base(IDS).logits
    sql = unit_edits(two, "sql")[0][2].A

    def loss() -> torch.Tensor:
        policy = two(IDS).logits.log_softmax(-1)
        with disabled(two) as model:
            assert active_adapters(two) == ()
            reference = model(IDS).logits
            torch.testing.assert_close(reference, expected, rtol=0, atol=0)
        assert active_adapters(two) == ("sql",)
        return (policy - reference.log_softmax(-1)).square().mean() + reference.mean()

    loss().backward()
    assert sql.grad is not None and sql.grad.abs().sum() > 0
    combined = sql.grad.clone()
    two.zero_grad()
    (two(IDS).logits.log_softmax(-1) - expected.log_softmax(-1)).square().mean().backward()
    torch.testing.assert_close(combined, sql.grad)  # the inside part added nothing
    with pytest.raises(RuntimeError), disabled(two):
        raise RuntimeError("inside")
    assert active_adapters(two) == ("sql",)  # restored after an error too


def test_delete_adapter_is_exact(two: nn.Module) -> None:
    base_state = state(tiny("llama"))
    set_active(two, "chat")
    chat = logits(two)
    set_active(two, ("sql", "chat"))
    delete_adapter(two, "sql")  # an active adapter beside another: the other still computes
    assert adapter_names(two) == ["chat"] and active_adapters(two) == ("chat",)
    torch.testing.assert_close(logits(two), chat, rtol=0, atol=0)
    delete_adapter(two, "chat")
    assert adapter_names(two) == [] and not any(isinstance(m, surgery.Site) for m in two.modules())
    assert_state(two, base_state)
    assert torch.equal(logits(two), logits(tiny("llama")))


def test_deleting_the_only_active_adapter_leaves_the_base(two: nn.Module) -> None:
    set_active(two, ())
    base = logits(two)
    set_active(two, "sql")
    delete_adapter(two, "sql")  # chat was inactive: the model now computes no adapter
    assert adapter_names(two) == ["chat"] and active_adapters(two) == ()
    assert torch.equal(logits(two), base)


def test_delete_unknown_or_failing_changes_nothing(
    two: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, out = state(two), logits(two)
    with pytest.raises(SurgeryError, match="no adapter named 'chatt'") as error:
        delete_adapter(two, "chatt")
    assert "did you mean 'chat'" in str(error.value)
    calls = []
    uninstall = type(SITE).uninstall

    def failing(self, model: nn.Module, edit) -> object:
        calls.append(edit.path)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return uninstall(self, model, edit)

    monkeypatch.setattr(type(SITE), "uninstall", failing)
    with pytest.raises(ExecutionError, match="disk on fire"):
        delete_adapter(two, "chat")
    assert len(calls) == 5
    assert adapter_names(two) == ["sql", "chat"] and active_adapters(two) == ("sql",)
    assert_state(two, before)
    assert torch.equal(logits(two), out)


def test_merge_adapter_is_refused_beside_others_then_exact(two: nn.Module) -> None:
    before, out = state(two), logits(two)
    with pytest.raises(
        PlanError, match="merging adapter 'sql' would change what adapter 'chat' computes"
    ) as error:
        merge_adapter(two, "sql")
    assert "`remove chat` first" in str(error.value)
    assert_state(two, before)
    assert adapter_names(two) == ["sql", "chat"] and torch.equal(logits(two), out)
    with pytest.raises(SurgeryError, match="no adapter named 'lora'"):
        merge_adapter(two, "lora")  # a method's name is not an adapter's
    delete_adapter(two, "chat")
    merge_adapter(two, "sql")
    assert adapter_names(two) == [] and not any(isinstance(m, surgery.Site) for m in two.modules())
    torch.testing.assert_close(logits(two), out, rtol=1e-5, atol=1e-5)


# ---- 3. trainability: set_active does not touch requires_grad -----------------------------


def test_an_inactive_adapter_stays_bit_identical_under_weight_decay(two: nn.Module) -> None:
    flags = {n: p.requires_grad for n, p in two.named_parameters()}
    set_active(two, "chat")
    set_active(two, "sql")
    assert {n: p.requires_grad for n, p in two.named_parameters()} == flags  # untouched
    optimizer = torch.optim.AdamW(
        [p for p in two.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    batch = (torch.arange(16) % 8).unsqueeze(0)

    def step() -> None:
        optimizer.zero_grad()
        two(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()

    set_active(two, "chat")
    step()  # chat trains once: it has optimizer state now
    set_active(two, "sql")
    chat = {k: v.clone() for k, v in state(two).items() if ".chat." in k}
    sql = {k: v.clone() for k, v in state(two).items() if ".sql." in k}
    for _ in range(3):
        step()
    now = state(two)
    assert all(torch.equal(now[k], v) for k, v in chat.items())
    assert all(not torch.equal(now[k], v) for k, v in sql.items())


def test_the_adapters_page_runs() -> None:
    """docs/adapters.md's Python blocks, in order, in one namespace (they assert what they say)."""
    from test_docs import ROOT, fenced

    namespace: dict[str, object] = {}
    for block in fenced(ROOT / "docs" / "adapters.md", "python"):
        exec(compile(block, "adapters.md", "exec"), namespace)
    model = tiny("llama")
    rewrite(model, TWO + "\nfreeze **.chat")
    assert unit_counts(model, "chat")[2] == 0


def test_adapters_cannot_be_named_like_keywords() -> None:
    """As text, `remove freeze` would read as `remove` (everything) then `freeze ...`."""
    with pytest.raises(PlanError, match="'freeze' starts a statement"):
        rewrite(tiny("llama"), f"adapter freeze {{ apply ia3 to {QV} }}")
