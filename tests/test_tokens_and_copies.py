"""Trainable token rows (`trainable_tokens`) and trained copies of whole modules (`trained_copy`),
against the real PEFT 0.21 (`trainable_token_indices` / TrainableTokensConfig and
`modules_to_save`): same trained values -> same logits, same trainable counts, gradients only where
they belong, exact merge and removal, and both PEFT spellings through the codecs, both ways.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig, LlamaForSequenceClassification

from surgery import PlanError, Site, rewrite
from surgery.edit import Edit
from surgery.execute import count_parameters
from surgery.io import write_adapter_dir
from surgery.io.adapters import live_adapter_tensors
from surgery.io.checkpoint import merge_checkpoint
from surgery.io.load import load_adapter
from surgery.methods import REGISTRY
from surgery.methods.codec import BY_PEFT_TYPE, CODECS, FIELD_CODECS
from surgery.models import preset_config, tiny

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 5, 9, 3, 200, 7, 1], [9, 9, 11, 0, 5, 42, 3]])
CHOSEN = [5, 9, 77, 3]  # 77 never occurs in IDS: its row must get no gradient
EMBED = "model.embed_tokens"


def edits_of(model: nn.Module) -> list[Edit]:
    """The edit records of a rewritten model, read off its sites."""
    return [
        Edit(path, key.name, key.method, options=key.options)
        for path, site in model.named_modules()
        if isinstance(site, Site)
        for key in site.edits
    ]


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def perturb(model: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))


def load(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    live = live_adapter_tensors(model)
    assert set(tensors) <= set(live), sorted(set(tensors) - set(live))
    with torch.no_grad():
        for key, tensor in tensors.items():
            live[key].copy_(tensor)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def classifier() -> nn.Module:
    config = preset_config("tiny-llama")
    config.update({"num_hidden_layers": 2, "num_labels": 3, "pad_token_id": 0})
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(**config.to_dict())).eval()


def set_peft(peft_model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    result = peft.set_peft_model_state_dict(peft_model, tensors)
    assert not result.unexpected_keys


# ---- trainable tokens -----------------------------------------------------------------------


def test_trainable_tokens_equal_peft_logits_counts_and_gradients() -> None:
    ours = tiny("llama")
    theirs = copy.deepcopy(ours)
    report = rewrite(ours, f"apply trainable_tokens(ids={CHOSEN}) to {EMBED}")
    assert (report.plan.trainable, report.plan.total) == (report.trainable, report.total)
    perturb(ours)
    fields, tensors = CODECS["trainable_tokens"].export(
        edits_of(ours), live_adapter_tensors(ours), ours
    )
    config = peft.TrainableTokensConfig(**{k: v for k, v in fields.items() if k != "peft_type"})
    theirs = peft.get_peft_model(theirs, config)
    set_peft(theirs, tensors)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0] == len(CHOSEN) * 64

    for model in (ours, theirs):
        model(IDS).logits.square().mean().backward()
    site = ours.model.embed_tokens
    values = site.trainable_tokens.values
    assert site.base.weight.grad is None
    used = torch.tensor([i in IDS for i in CHOSEN])
    assert (values.grad.abs().sum(-1) > 0).tolist() == used.tolist()
    delta = theirs.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]
    torch.testing.assert_close(values.grad, delta.grad, rtol=1e-4, atol=1e-7)


def test_trainable_tokens_identity_merge_and_remove() -> None:
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = logits(model)
    rewrite(model, f"apply trainable_tokens(ids={CHOSEN}) to {EMBED}")
    assert torch.equal(logits(model), reference)  # identity at insertion, bit for bit
    perturb(model)
    unmerged = logits(model)
    merged = copy.deepcopy(model)
    rewrite(merged, "merge")
    assert type(merged.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(logits(merged), unmerged, rtol=1e-6, atol=1e-6)
    values = model.model.embed_tokens.trainable_tokens.values.detach()
    weight = merged.model.embed_tokens.weight
    assert torch.equal(weight[CHOSEN], values)  # the rows are the values, nothing else moved
    others = [i for i in range(256) if i not in CHOSEN]
    assert torch.equal(weight[others], before[f"{EMBED}.weight"][others])
    site = model.model.embed_tokens
    assert_merged_is_pure(site, "trainable_tokens")
    rewrite(model, "remove")
    assert type(model.model.embed_tokens) is nn.Embedding
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def assert_merged_is_pure(site: Site, edit: str) -> None:
    """`merged` reads its fp32 inputs and returns new tensors: the inputs are unchanged."""
    def fp32(module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    weights, tensors = fp32(site.base), fp32(site.edit_module(edit))
    copies = {k: v.clone() for k, v in {**weights, **tensors}.items()}
    key = next(e for e in site.edits if e.name == edit)
    changed = REGISTRY[key.method].merged(weights, tensors, key)
    assert all(torch.equal(v, copies[k]) for k, v in {**weights, **tensors}.items())
    assert all(changed[k].shape == weights[k].shape and changed[k].dtype == torch.float32
               for k in changed)


def test_trainable_tokens_in_half_precision_keep_fp32_values() -> None:
    model = tiny("llama").to(torch.bfloat16)
    reference = logits(model)
    rewrite(model, f"apply trainable_tokens(ids={CHOSEN}) to {EMBED}")
    assert model.model.embed_tokens.trainable_tokens.values.dtype == torch.float32
    assert torch.equal(logits(model), reference)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (f"apply trainable_tokens(ids=[]) to {EMBED}", "at least one token id"),
        (f"apply trainable_tokens(ids=[4, 4]) to {EMBED}", "listed twice"),
        (f"apply trainable_tokens(ids=[256]) to {EMBED}", r"outside the embedding's rows \[0, "),
        (f"apply trainable_tokens(ids=[1, true]) to {EMBED}", "must be integers"),
        (f"apply trainable_tokens to {EMBED}", "at least one token id"),
        ("apply trainable_tokens(ids=[1]) to lm_head", "not Linear"),
    ],
)
def test_trainable_tokens_refusals(rule: str, message: str) -> None:
    model = tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=message) as error:
        rewrite(model, rule)
    if "ids=" in rule and rule.endswith(EMBED):  # the caret is on the argument
        assert error.value.span.text.startswith("ids=")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_trainable_tokens_refuse_tied_padding_and_custom_forwards() -> None:
    with pytest.raises(PlanError, match=r"shared with lm_head\.weight"):
        rewrite(tiny("gpt2"), "apply trainable_tokens(ids=[1]) to transformer.wte")

    class Scaled(nn.Embedding):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input) * 2.0

    holder = nn.ModuleDict({"pad": nn.Embedding(10, 4, padding_idx=0), "scaled": Scaled(10, 4)})
    with pytest.raises(PlanError, match="padding_idx"):
        rewrite(holder, "apply trainable_tokens(ids=[0, 1]) to pad")
    with pytest.raises(PlanError, match=r"overrides Embedding\.forward"):
        rewrite(holder, "apply trainable_tokens(ids=[1]) to scaled")


def test_trainable_tokens_codec_imports_a_peft_adapter() -> None:
    theirs = peft.get_peft_model(tiny("llama"), peft.TrainableTokensConfig(token_indices=CHOSEN))
    perturb(theirs)
    config = theirs.peft_config["default"].to_dict()
    codec = CODECS[BY_PEFT_TYPE[str(config["peft_type"].value)]]
    rules, tensors = codec.import_(
        config, peft.get_peft_model_state_dict(theirs), module_names(tiny("llama"))
    )
    ours = tiny("llama")
    rewrite(ours, rules)
    load(ours, tensors)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_save_load_and_streaming_merge(tmp_path: Path) -> None:
    """What the conformance suite does for the methods its Linear probe fits."""
    base = tmp_path / "base"
    tiny("llama").save_pretrained(base)
    rules = f"apply trainable_tokens(ids={CHOSEN}) to {EMBED}\napply trained_copy to lm_head"
    model = tiny("llama")
    report = rewrite(model, rules)
    perturb(model)
    write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=report.plan)
    fresh = tiny("llama")
    load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    merge_checkpoint(base, tmp_path / "adapter", tmp_path / "merged", progress=False)
    rewrite(model, "merge")
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        streamed = {k: f.get_tensor(k) for k in f.keys()}
    merged = model.state_dict()
    for key in (f"{EMBED}.weight", "lm_head.weight"):
        assert torch.equal(streamed[key], merged[key]), key


# ---- trained copies ---------------------------------------------------------------------------


class Parts(nn.Module):
    """An Embedding, a LayerNorm and a Linear head, each copied in turn."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.norm, self.head = nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


@pytest.mark.parametrize("target", ["embed", "norm", "head"])
def test_trained_copy_identity_gradients_merge_and_remove(target: str) -> None:
    model, ids = Parts(), IDS % 20
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(ids)
    report = rewrite(model, f"apply trained_copy to {target}")
    original = getattr(model, target).base
    own = sum(p.numel() for p in original.parameters())
    assert report.trainable == report.plan.trainable == own  # the plan counted exactly
    assert report.total == report.plan.total == 2 * own + sum(
        p.numel() for n, p in Parts().named_parameters() if not n.startswith(target)
    )
    with torch.no_grad():
        assert torch.equal(model(ids), reference)
    perturb(model)
    model(ids).square().mean().backward()
    the_copy = getattr(model, target).trained_copy
    assert all(p.grad is None and not p.requires_grad for p in original.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in the_copy.parameters())
    with torch.no_grad():
        unmerged = model(ids)
        merged = copy.deepcopy(model)
        rewrite(merged, "merge")
        assert type(getattr(merged, target)) is type(original)
        assert torch.equal(merged(ids), unmerged)
    assert_merged_is_pure(getattr(model, target), "trained_copy")
    rewrite(model, "remove")
    assert type(getattr(model, target)) is type(original)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_trained_copy_refusals() -> None:
    cases = [
        ("apply lora(r=2) to lm_head\napply trained_copy to lm_head", "'lora' .* would do nothing"),
        ("apply trained_copy to lm_head\napply ia3(on=input) to lm_head", "would do nothing"),
        ("apply trained_copy to lm_head\napply trained_copy to lm_head as c2", "would do nothing"),
        ("apply trained_copy to model.layers.0.mlp", "without submodules"),
        ("apply trained_copy to model.layers.0.mlp.act_fn", "no parameters"),
    ]
    for rule, message in cases:
        model = tiny("llama")
        with pytest.raises(PlanError, match=message):
            rewrite(model, rule)
        assert not any(isinstance(m, Site) for m in model.modules())
    model = tiny("llama")  # an edit after the copy acts on the copy's output: accepted
    rewrite(model, "apply trained_copy to lm_head\napply lora(r=2) to lm_head")
    perturb(model)
    unmerged = logits(model)
    rewrite(model, "merge")  # the copy first, then LoRA on top: exact
    torch.testing.assert_close(logits(model), unmerged, rtol=1e-5, atol=1e-5)


# ---- LoRA + modules_to_save + trainable_token_indices: one PEFT directory -------------------

LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"
HOST = (
    "apply lora(r=4, alpha=8) to *.q_proj\napply trained_copy to score\n"
    f"apply trainable_tokens(ids={CHOSEN}) to {EMBED}"
)


def field_export(model: nn.Module) -> tuple[dict, dict]:
    """What io's export does for a LoRA adapter with riding fields: the field codecs' parts."""
    edits, live, names = edits_of(model), live_adapter_tensors(model), module_names(model)
    fields, tensors = {}, {}
    for codec in FIELD_CODECS.values():
        mine = [e for e in edits if e.method == codec.method]
        if mine:
            more_fields, more = codec.export(mine, live, names)
            fields.update(more_fields)
            tensors.update(more)
    for edit in edits:  # the LoRA host's tensors (its codec is not this file's subject)
        if edit.method == "lora":
            prefix = f"base_model.model.{edit.path}"
            tensors[f"{prefix}.{LORA_A}"] = live[f"{edit.path}.lora.A"]
            tensors[f"{prefix}.{LORA_B}"] = live[f"{edit.path}.lora.B"]
    return fields, tensors


def test_lora_with_copy_and_tokens_equals_peft_both_ways() -> None:
    ours = classifier()
    theirs = copy.deepcopy(ours)
    rewrite(ours, HOST)
    perturb(ours)
    fields, tensors = field_export(ours)
    assert fields == {"modules_to_save": ["score"], "trainable_token_indices": {EMBED: CHOSEN}}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs, config)
    set_peft(theirs, tensors)
    theirs.eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]

    # back: a PEFT state dict -> the field codecs take their keys, the host gets the rest
    saved = peft.get_peft_model_state_dict(theirs)
    saved_config = theirs.peft_config["default"].to_dict()
    names = module_names(classifier())
    rules, imported, rest = [], {}, dict(saved)
    for field, codec in FIELD_CODECS.items():
        if saved_config.get(field) is not None:
            owned = codec.owns(saved_config, list(rest), names)
            text, more = codec.import_(saved_config, {k: rest.pop(k) for k in owned}, names)
            rules.append(text)
            imported.update(more)
    assert all(k.endswith((LORA_A, LORA_B)) for k in rest)
    rules.append("apply lora(r=4, alpha=8) to *.q_proj")
    for key, tensor in rest.items():
        path = key.removeprefix("base_model.model.").rsplit(".", 2)[0]
        imported[f"{path}.lora.{'A' if key.endswith(LORA_A) else 'B'}"] = tensor
    back = classifier()
    rewrite(back, "\n".join(rules))
    load(back, imported)
    torch.testing.assert_close(logits(back), logits(theirs), rtol=1e-5, atol=1e-5)


def test_modules_to_save_of_a_container_imports_as_copies_of_its_parts() -> None:
    """PEFT copies a whole head; surgery copies each of its submodules with tensors: the same."""

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense, self.act, self.out = nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.act(self.dense(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body, self.classifier = nn.Linear(8, 8), Head()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.body(x))

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    config = peft.LoraConfig(r=2, target_modules=["body"], modules_to_save=["classifier"])
    theirs = peft.get_peft_model(Net(), config)
    perturb(theirs)
    codec = FIELD_CODECS["modules_to_save"]
    saved, names = peft.get_peft_model_state_dict(theirs), module_names(Net())
    owned = codec.owns(config.to_dict(), list(saved), names)
    assert owned == {k for k in saved if k.startswith("base_model.model.classifier.")}
    rules, tensors = codec.import_(config.to_dict(), {k: saved[k] for k in owned}, names)
    assert rules == "apply trained_copy to ^classifier.dense, ^classifier.out expect 2"
    ours = Net()
    rewrite(ours, rules + "\napply lora(r=2, alpha=8) to body")
    load(ours, tensors)
    factors = {LORA_A: "A", LORA_B: "B"}
    load(ours, {f"body.lora.{factors[k.split('body.')[1]]}": t for k, t in saved.items()
                if k not in owned})
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_codecs_refuse_what_peft_would_read_differently() -> None:
    from surgery.io.peft_config import PeftFormatError

    copies, tokens = FIELD_CODECS["modules_to_save"], CODECS["trainable_tokens"]
    head = Edit("head", "trained_copy", "trained_copy")
    weight = {"head.trained_copy.weight": torch.ones(2, 2)}
    with pytest.raises(PeftFormatError, match=r"would also select aux\.head"):
        copies.export([head], weight, ["head", "aux.head"])  # PEFT matches by suffix
    a, b = (Edit(p, "trainable_tokens", "trainable_tokens", options=(("ids", ids),))
            for p, ids in (("a", (1, 2)), ("b", (3,))))
    with pytest.raises(PeftFormatError, match="one token list"):
        tokens.export([a, b], {}, nn.Module())
    saved = {"base_model.model.other.weight": torch.ones(2)}
    with pytest.raises(PeftFormatError, match="not a tensor of a module"):
        copies.import_({"modules_to_save": ["head"]}, saved, ["head"])
    with pytest.raises(PeftFormatError, match="ensure_weight_tying"):
        copies.import_({"modules_to_save": ["head"], "ensure_weight_tying": True}, {}, ["head"])
    with pytest.raises(PeftFormatError, match="none of its tensors is saved"):
        copies.import_({"modules_to_save": ["head"]}, {}, ["head"])
    table = {"base_model.model.embed.trainable_tokens_delta": torch.ones(3, 4)}
    with pytest.raises(PeftFormatError, match=r"expected \[2, dim\]"):
        tokens.import_({"token_indices": [1, 2]}, table, ["embed"])
