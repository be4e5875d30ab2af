"""Prompt tuning, P-tuning, prefix tuning and P-tuning v2: model-level virtual-token edits.

What must hold: generate() with the cache equals step-by-step decoding without it (so the mask,
positions and cache are right), left padding changes nothing for a row, labels ignore the
virtual positions, merge bakes exactly, remove restores the model exactly, counts are exact,
and the edits compose with site-level methods in any removal order.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import FalconConfig, LlamaConfig

import surgery
from surgery import PlanError, SurgeryError, rewrite
from surgery.graph import model_edit
from surgery.models import from_config, tiny
from tests.conftest import train_losses

FAMILY = {"llama": "layers.*", "falcon": "layers.*"}
RULES = {
    "prompt": "apply prompt(n=4) to embed",
    "p_tuning": "apply p_tuning(n=4, hidden=24) to embed",
    "p_tuning_lstm": "apply p_tuning(n=3, encoder=lstm, hidden=8) to embed",
    "prefix": "apply prefix(n=4, hidden=24) to layers.*",
    "p_tuning_v2": "apply p_tuning_v2(n=3) to layers.*",
}
ADDS_POSITIONS = {"prompt", "p_tuning", "p_tuning_lstm"}  # the prompt's rows show in the logits
NO_EOS = {"eos_token_id": None, "pad_token_id": 0}


def rules(family: str, method: str) -> str:
    return f"use {family}\n{RULES[method]}\n"


def greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        logits = model(ids, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial virtual tokens (zero-mean, model-sized), so every check can fail."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "encoder" in name else 1.0))


IDS = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", ["llama", "falcon"])
@pytest.mark.parametrize("method", list(RULES))
def test_generate_with_cache_equals_decoding_without_it(family: str, method: str) -> None:
    model = tiny(family).eval()
    rewrite(model, rules(family, method))
    randomize(model)
    generated = model.generate(IDS, max_new_tokens=4, do_sample=False, **NO_EOS)
    assert torch.equal(generated, greedy_without_cache(model, IDS, 4))
    # and the virtual tokens matter: the logits differ from the model without them
    logits = model(IDS).logits
    n = 4 if method not in ("p_tuning_lstm", "p_tuning_v2") else 3
    if method in ADDS_POSITIONS:
        assert logits.shape[1] == IDS.shape[1] + n
        logits = logits[:, n:]
    else:
        assert logits.shape[1] == IDS.shape[1]
    surgery.rewrite(model, "remove")
    assert not torch.allclose(logits, model(IDS).logits, atol=1e-3)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_left_padding_changes_nothing_for_a_row(family: str, method: str) -> None:
    model = tiny(family).eval()
    rewrite(model, rules(family, method))
    randomize(model)
    short = IDS[1:, 2:]  # 4 tokens, left-padded by 2 in the batch
    batch = torch.cat([IDS[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :2] = 0
    together = model.generate(
        batch, attention_mask=mask, max_new_tokens=3, do_sample=False, **NO_EOS
    )
    alone = model.generate(short, max_new_tokens=3, do_sample=False, **NO_EOS)
    assert torch.equal(together[1, 2:], alone[0])
    first = model.generate(IDS[:1], max_new_tokens=3, do_sample=False, **NO_EOS)
    assert torch.equal(together[0], first[0])


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_labels_ignore_the_virtual_positions(llama: nn.Module, method: str) -> None:
    rewrite(llama, rules("llama", method))
    randomize(llama)
    out = llama(IDS, labels=IDS)
    # virtual positions are never targets; the last one predicts the user's first token
    logits = out.logits[:, 3:-1]
    expected = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("method", ["prefix", "p_tuning_v2"])
def test_prefix_loss_is_the_plain_loss_shape(llama: nn.Module, method: str) -> None:
    rewrite(llama, rules("llama", method))
    randomize(llama)
    out = llama(IDS, labels=IDS)
    expected = nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), IDS[:, 1:].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("family", ["llama", "falcon"])
@pytest.mark.parametrize("method", list(RULES))
def test_counts_flags_and_exact_remove(family: str, method: str) -> None:
    model = tiny(family)
    before = state(model)
    report = rewrite(model, rules(family, method))
    edit = report.plan.steps[-1].edit
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(f"{edit}.") for n in trainable)
    assert (
        report.plan.trainable
        == report.trainable
        == sum(p.numel() for p in model.parameters() if p.requires_grad)
    )
    assert report.plan.total == report.total
    rewrite(model, f"remove {edit}")
    assert not model._forward_pre_hooks and edit not in model._modules
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_prompt_count_formulas(llama: nn.Module) -> None:
    hidden, layers = 64, 4
    kv = 2 * 16  # 2 key/value heads of 16
    plans = {m: surgery.plan(llama, rules("llama", m)).trainable for m in RULES}
    assert plans["prompt"] == 4 * hidden
    assert plans["p_tuning_v2"] == 3 * layers * 2 * kv
    table, width = 4 * hidden, layers * 2 * kv
    assert plans["prefix"] == table + (hidden * 24 + 24) + (24 * width + width)
    mlp = (hidden * 24 + 24) + (24 * 24 + 24) + (24 * hidden + hidden)
    assert plans["p_tuning"] == table + mlp


@pytest.mark.parametrize("method", ["p_tuning", "p_tuning_lstm", "prefix"])
def test_merge_bakes_the_encoder_exactly(llama: nn.Module, method: str) -> None:
    llama.eval()
    report = rewrite(llama, rules("llama", method))
    edit = report.plan.steps[-1].edit
    randomize(llama)
    expected = llama(IDS).logits
    merged = rewrite(llama, f"merge {edit}")
    adapter = llama._modules[edit]
    assert "encoder" not in adapter._modules
    (table,) = adapter.parameters()
    assert not table.requires_grad
    assert merged.plan.total == merged.total == sum(p.numel() for p in llama.parameters())
    torch.testing.assert_close(llama(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(
        llama.generate(IDS, max_new_tokens=3, do_sample=False, **NO_EOS),
        greedy_without_cache(llama, IDS, 3),
    )


@pytest.mark.parametrize("method", ["prompt", "p_tuning_v2"])
def test_merging_a_plain_table_is_a_plan_error(llama: nn.Module, method: str) -> None:
    rewrite(llama, rules("llama", method))
    before = state(llama)
    with pytest.raises(PlanError, match=r"cannot be merged.*no encoder"):
        rewrite(llama, "merge")
    assert all(torch.equal(llama.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("apply prompt(n=4) to attn.q", "select model.embed_tokens"),
        ("apply prompt(n=4) to head", "select model.embed_tokens"),
        ("apply prefix(n=4) to layers[0:2]", "select one module per layer"),
        ("apply prefix(n=4) to attn.q, attn.k", "select one module per layer"),
        ("apply prompt(n=4, init=ids, ids=[1, 999]) to embed", r"in \[0, 256\), got 999"),
        ("apply prompt(n=4, init=ids) to embed", "needs at least one token"),
        ('apply prompt(n=4, init=text, text="hello") to embed', "needs the model's tokenizer"),
        ("apply prompt(n=0) to embed", "must be at least 1"),
        ("apply p_tuning(encoder=gru) to embed", "must be one of mlp, lstm"),
        ("apply prefix(n=2) to *.mlp.down_proj", r"down_proj \(Linear\), which never sees"),
        ("apply prefix(n=2) to layers.*.mlp", r"mlp \(LlamaMLP\), which never sees the cache"),
        ("apply prompt(n=2) to embed as model", "already the name of a child of the model"),
        ("apply prompt(n=2) to embed as forward", "'forward' is an attribute of the model"),
    ],
)
def test_selection_and_argument_errors(llama: nn.Module, rule: str, message: str) -> None:
    before = state(llama)
    with pytest.raises(SurgeryError, match=message) as caught:
        rewrite(llama, f"use llama\n{rule}")
    assert "2:" in caught.value.span.location
    assert not llama._forward_pre_hooks
    assert list(llama.state_dict()) == list(before)


def test_the_caret_points_at_the_bad_token_ids(llama: nn.Module) -> None:
    with pytest.raises(SurgeryError) as caught:
        rewrite(llama, "use llama\napply prompt(n=4, init=ids, ids=[1, 999]) to embed")
    caret_line = str(caught.value).splitlines()[3]
    assert caret_line.index("^") == str(caught.value).splitlines()[2].index("ids=[")
    assert caught.value.span.column == len("apply prompt(n=4, init=ids, ") + 1


def test_one_virtual_token_edit_per_model(llama: nn.Module) -> None:
    rewrite(llama, rules("llama", "prompt"))
    with pytest.raises(PlanError, match="already has a virtual-token edit, 'prompt'"):
        rewrite(llama, rules("llama", "prefix"))
    assert len(model_edit.edit_keys(llama)) == 1


def test_init_from_vocabulary_and_ids(llama: nn.Module) -> None:
    weight = llama.get_input_embeddings().weight
    rewrite(llama, "use llama\napply prompt(n=5, init=ids, ids=[3, 4]) to embed")
    torch.testing.assert_close(llama.prompt.embedding, weight[[3, 4, 3, 4, 3]])
    rewrite(llama, "remove prompt\nuse llama\napply prompt(n=6, init=vocab) to embed")
    rows = llama.prompt.embedding
    assert all(any(torch.equal(row, w) for w in weight) for row in rows)
    rewrite(llama, "remove prompt\nuse llama\napply prompt(n=6, range=0.1) to embed")
    assert llama.prompt.embedding.abs().max() <= 0.1


@pytest.mark.parametrize("method", list(RULES))
def test_training_only_the_virtual_tokens_lowers_the_loss(method: str) -> None:
    torch.manual_seed(0)
    model = tiny("llama")
    rewrite(model, rules("llama", method))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    losses = train_losses(model, torch.optim.Adam(params, lr=3e-2), steps=25)
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_composes_with_lora_and_ia3_and_comes_apart_in_any_order() -> None:
    base = tiny("llama").eval()
    before = state(base)
    reference = base(IDS).logits
    program = (
        "use llama\napply lora(r=4) to attn.q, attn.v\napply ia3 to attn.k, attn.v\n"
        "apply prompt(n=4) to embed\n"
    )
    for order in itertools.permutations(["lora", "ia3", "prompt"]):
        model = copy.deepcopy(base)
        rewrite(model, program)
        randomize(model)
        assert not torch.allclose(model(IDS).logits[:, 4:], reference, atol=1e-3)
        for edit in order:
            rewrite(model, f"remove {edit}")
        after = model.state_dict()
        assert list(after) == list(before) and not model._forward_pre_hooks
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert torch.equal(model(IDS).logits, reference)


def test_survives_deepcopy_and_torch_save(llama: nn.Module) -> None:
    llama.eval()
    rewrite(llama, rules("llama", "prefix"))
    randomize(llama)
    expected = llama(IDS).logits
    buffer = io.BytesIO()
    torch.save(llama, buffer)
    buffer.seek(0)
    for copy_ in (copy.deepcopy(llama), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(copy_(IDS).logits, expected, atol=0, rtol=0)
        rewrite(copy_, "remove prefix")
        assert not copy_._forward_pre_hooks


def test_plan_shows_the_model_as_the_target(llama: nn.Module) -> None:
    plan = surgery.plan(llama, rules("llama", "prefix"))
    (target,) = plan.steps[-1].targets
    assert target.path == "" and target.module_type == "LlamaForCausalLM"
    assert dict(target.shapes)["embedding"] == (4, 64)
    # and `freeze`/`unfreeze` can address the planned table by its path
    plan = surgery.plan(llama, rules("llama", "prefix") + "freeze prefix.encoder\n")
    assert plan.trainable == 4 * 64


@st.composite
def small_models(draw: st.DrawFn) -> tuple[str, nn.Module]:
    head_dim = draw(st.sampled_from([4, 8]))
    heads = draw(st.sampled_from([2, 4]))
    layers = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 1000))
    if draw(st.booleans()):
        kv = draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0]))
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=heads * head_dim,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            initializer_range=0.1,
        )
        return "llama", from_config(config, seed=seed)
    variant = draw(st.sampled_from(["multi_query", "new", "classic"]))
    config = FalconConfig(
        vocab_size=64,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        multi_query=variant == "multi_query",
        new_decoder_architecture=variant == "new",
        num_kv_heads=min(2, heads) if variant == "new" else heads,
        parallel_attn=True,
        bias=False,
        initializer_range=0.1,
    )
    return "falcon", from_config(config, seed=seed)


@settings(max_examples=12, deadline=None)
@given(small_models(), st.sampled_from(list(RULES)), st.integers(1, 5))
def test_property_cache_decoding_counts_and_remove(
    case: tuple[str, nn.Module], method: str, n: int
) -> None:
    family, model = case
    model.eval()
    before = state(model)
    rule = rules(family, method).replace("n=4", f"n={n}").replace("n=3", f"n={n}")
    report = rewrite(model, rule)
    assert report.plan.trainable == report.trainable
    randomize(model, seed=n)
    ids = IDS[:, :4] % 64
    generated = model.generate(ids, max_new_tokens=2, do_sample=False, **NO_EOS)
    assert torch.equal(generated, greedy_without_cache(model, ids, 2))
    rewrite(model, "remove")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_counts_on_the_llama_2_7b_skeleton() -> None:
    from surgery.models import load_model

    model = load_model("llama-2-7b", meta=True)
    assert rewrite(model, "use llama\napply prompt(n=20) to embed").trainable == 20 * 4096
    rewrite(model, "remove prompt")
    report = rewrite(model, "use llama\napply p_tuning_v2(n=20) to layers.*")
    assert report.trainable == report.plan.trainable == 20 * 2 * 32 * 4096  # 5,242,880


def test_prompt_on_an_encoder_pads_token_types_and_masked_lm_labels() -> None:
    model = tiny("bert").eval()
    rewrite(model, "use auto\napply prompt(n=4) to embed")
    randomize(model)
    ids = IDS % 200
    types, mask = torch.zeros_like(ids), torch.ones_like(ids)
    out = model(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=ids)
    assert out.logits.shape[:2] == (2, 4 + ids.shape[1])
    logits = out.logits[:, 4:]
    expected = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("method", ["prefix", "p_tuning_v2"])
def test_prefix_needs_a_generative_decoder(method: str) -> None:
    with pytest.raises(PlanError, match="BertForMaskedLM is not one"):
        rewrite(tiny("bert"), f"use auto\napply {method}(n=2) to layers.*")
