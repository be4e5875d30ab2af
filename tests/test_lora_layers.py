"""LoRA on nn.Embedding, nn.Conv1d and nn.Conv2d against the real PEFT 0.21: same weights give
the same outputs, trainable counts, merged weights; insertion is an identity, remove is exact,
and what PEFT cannot merge exactly is refused at plan time."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from surgery import PlanError, Site, rewrite
from surgery.models import tiny

IDS = torch.arange(3, 19).unsqueeze(0)


class ConvNet(nn.Module):
    """Conv1d and Conv2d layers of every shape LoRA distinguishes: kxk with stride and padding,
    1x1, with and without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.p2 = nn.Conv2d(6, 5, 1, bias=False)
        self.c1 = nn.Conv1d(5, 7, 3, padding=2)
        self.p1 = nn.Conv1d(7, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.p2(torch.tanh(self.c2(x))))  # [n, 5, 4, 4]
        return self.p1(torch.tanh(self.c1(h.flatten(2))))


CONVS = ["c2", "p2", "c1", "p1"]
X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


def sites(model: nn.Module) -> dict[str, Site]:
    return {path: m for path, m in model.named_modules() if isinstance(m, Site)}


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Move every adapter tensor off its identity init, so that merges prove something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in sites(model).values():
            for edit in site.edits:
                for tensor in site.edit_module(edit.name).parameters():
                    tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))


def peft_twin(
    model: nn.Module, ours: nn.Module, targets: list[str], r: int, alpha: float, same_m: bool = True
):
    """PEFT's LoRA (DoRA for a dora rule) on a copy of `model` (before surgery), holding the
    same tensors as `ours` (DoRA's magnitude kept as PEFT initialized it unless `same_m`).
    PEFT's magnitude is [1, out, 1, ...] on a conv, surgery's [out]."""
    method = next(iter(sites(ours).values())).edits[0].method
    lora_bias = any(hasattr(s.edit_module(method), "bias") for s in sites(ours).values())
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_dora=method == "dora",
        lora_bias=lora_bias,
    )
    reference = get_peft_model(copy.deepcopy(model), config)
    layers = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules()}
    with torch.no_grad():
        for path, site in sites(ours).items():
            edit, layer = site.edit_module(method), layers[path]
            if hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A:
                layer.lora_embedding_A["default"].copy_(edit.A)
                layer.lora_embedding_B["default"].copy_(edit.B)
            else:
                layer.lora_A["default"].weight.copy_(edit.A)
                layer.lora_B["default"].weight.copy_(edit.B)
                if lora_bias:
                    layer.lora_B["default"].bias.copy_(edit.bias)
            if method == "dora" and same_m:
                magnitude = layer.lora_magnitude_vector["default"].weight
                magnitude.copy_(edit.m.reshape(magnitude.shape))
    return reference


def check_against_peft(model, rules, targets, r, alpha, run) -> None:
    """Identity at insertion, PEFT's outputs and counts, merge (= unmerged, = PEFT's merged
    weights) and remove (bit-exact), for one LoRA or DoRA rule over `model`."""
    original = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = run(model)
    report = rewrite(model, rules)
    assert torch.equal(run(model), before)  # insertion is an identity, bit for bit
    method = next(iter(sites(model).values())).edits[0].method
    if method == "dora":  # the initial magnitude is PEFT's (the table's or kernel's norms)
        initial = peft_twin(original, model, targets, r, alpha, same_m=False)
        for path, site in sites(model).items():
            layer = dict(initial.named_modules())[f"base_model.model.{path}"]
            theirs = layer.lora_magnitude_vector["default"].weight.flatten()
            torch.testing.assert_close(site.edit_module("dora").m, theirs, rtol=1e-6, atol=0)
    perturb(model)
    reference = peft_twin(original, model, targets, r, alpha)
    out = run(model)
    torch.testing.assert_close(out, run(reference), rtol=1e-5, atol=1e-5)
    assert (report.trainable, report.total) == reference.get_nb_trainable_parameters()

    removed = copy.deepcopy(model)
    rewrite(removed, f"remove {method}")
    assert list(removed.state_dict()) == list(state)
    assert all(torch.equal(removed.state_dict()[k], v) for k, v in state.items())

    rewrite(model, f"merge {method}")
    assert not sites(model)
    torch.testing.assert_close(run(model), out, rtol=1e-5, atol=1e-5)
    theirs = reference.merge_and_unload().state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-5)


def test_embedding_matches_peft() -> None:
    model = tiny("llama").eval()
    check_against_peft(
        model,
        "apply lora(r=4, alpha=8) to model.embed_tokens",
        ["embed_tokens"],
        4,
        8,
        lambda m: m(IDS).logits,
    )


def test_embedding_init_is_peft_s() -> None:
    """A starts at zero, B ~ N(0, 1): the reverse of Linear, as in PEFT."""
    model = tiny("llama")
    rewrite(model, "apply lora(r=4) to model.embed_tokens")
    lora = sites(model)["model.embed_tokens"].edit_module("lora")
    assert lora.A.shape == (4, model.config.vocab_size) and not lora.A.any()
    assert lora.B.shape == (model.config.hidden_size, 4) and 0.5 < float(lora.B.std()) < 1.5


def test_embedding_with_padding_idx_matches_peft() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8, padding_idx=0), nn.Tanh(), nn.Linear(8, 3)).eval()
    ids = torch.tensor([[0, 1, 5, 0, 19]])
    check_against_peft(model, "apply lora(r=2) to 0", ["0"], 2, 8, lambda m: m(ids))


def test_conv_layers_match_peft() -> None:
    check_against_peft(
        conv_net(), "apply lora(r=2, alpha=4) to ** : Conv1d, ** : Conv2d", CONVS, 2, 4,
        lambda m: m(X),
    )


def test_lora_bias_matches_peft() -> None:
    model = nn.Sequential(conv_net(), nn.Linear(18, 3))  # over the last (length) axis
    check_against_peft(
        model, "apply lora(r=2, alpha=4, bias=true) to 0.c2, 0.c1, 0.p1, 1",
        ["0.c2", "0.c1", "0.p1", "1"], 2, 4, lambda m: m(X),
    )


def test_lora_bias_without_a_base_bias_trains_but_does_not_merge() -> None:
    model = conv_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = rewrite(model, "apply lora(r=2, bias=true) to p2")
    assert report.trainable == 2 * (6 + 5) + 5
    with pytest.raises(PlanError, match="merge"):
        rewrite(model, "merge")
    rewrite(model, "remove lora")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_dora_on_conv_layers_matches_peft() -> None:
    check_against_peft(
        conv_net(), "apply dora(r=2, alpha=4) to ** : Conv1d, ** : Conv2d", CONVS, 2, 4,
        lambda m: m(X),
    )


def test_dora_on_embedding_matches_peft() -> None:
    check_against_peft(
        tiny("llama").eval(),
        "apply dora(r=4, alpha=8) to model.embed_tokens",
        ["embed_tokens"],
        4,
        8,
        lambda m: m(IDS).logits,
    )


def test_conv_gradients_equal_peft_s() -> None:
    model = conv_net()
    original = copy.deepcopy(model)
    rewrite(model, "apply lora(r=2, alpha=4) to c2, c1")
    perturb(model)
    reference = peft_twin(original, model, ["c2", "c1"], 2, 4)
    model(X).square().sum().backward()
    reference(X).square().sum().backward()
    for path in ("c2", "c1"):
        ours = sites(model)[path].edit_module("lora")
        theirs = dict(reference.named_modules())[f"base_model.model.{path}"]
        for name in ("A", "B"):
            grad = getattr(theirs, f"lora_{name}")["default"].weight.grad
            torch.testing.assert_close(getattr(ours, name).grad, grad, rtol=1e-4, atol=1e-6)


def test_tied_embedding_applies_but_merge_is_refused() -> None:
    model = tiny("gpt2").eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    before = model(IDS).logits
    rewrite(model, "apply lora(r=2) to transformer.wte")
    assert torch.equal(model(IDS).logits, before)
    with pytest.raises(PlanError, match="tied weights"):
        rewrite(model, "merge")
    rewrite(model, "remove lora")
    assert torch.equal(model(IDS).logits, before)


@pytest.mark.parametrize(
    ("module", "call", "complaint"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), "lora(r=2)", "grouped"),
        (nn.Conv2d(4, 4, 3, dilation=2), "lora(r=2)", "dilation"),
        (nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), "lora(r=2)", "padding_mode"),
        (nn.Conv2d(2, 3, 1), "lora(r=3)", "rank limit"),
        (nn.Embedding(10, 4, max_norm=1.0), "lora(r=2)", "max_norm"),
        (nn.Embedding(10, 4), "lora(r=2, dropout=0.1)", "dropout"),
        (nn.Embedding(10, 4), "lora(r=2, init=gaussian)", "init"),
        (nn.Embedding(10, 4), "lora(r=2, init=pissa)", "init"),
        (nn.Embedding(10, 4), "lora(r=2, bias=true)", "bias"),
        (nn.Linear(4, 4), "dora(r=2, bias=true)", "no parameter 'bias'"),
        (nn.Conv2d(4, 4, 3), "lora(r=2, init=olora)", "init"),
        (nn.Conv2d(4, 4, 3, groups=2), "dora(r=2)", "grouped"),
        (nn.Embedding(10, 4), "dora(r=2, dropout=0.1)", "dropout"),
    ],
)
def test_what_peft_cannot_do_exactly_is_refused(module, call, complaint) -> None:
    model = nn.Sequential(module)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match=complaint):
        rewrite(model, f"apply {call} to 0")
    assert isinstance(model[0], type(module))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_subclass_with_its_own_forward_is_refused() -> None:
    class Scaled(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 2.0

    with pytest.raises(PlanError, match="not Embedding's own"):
        rewrite(nn.Sequential(Scaled(10, 4)), "apply lora(r=2) to 0")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_half_precision_embedding_and_conv_keep_fp32_adapters(method: str) -> None:
    model = nn.Sequential(nn.Embedding(10, 6), nn.Conv1d(4, 6, 3)).to(torch.bfloat16)
    ids, x = torch.tensor([[1, 2, 3]]), torch.randn(1, 4, 5, dtype=torch.bfloat16)
    before = model[0](ids), model[1](x)
    rewrite(model, f"apply {method}(r=2) to 0, 1")
    assert torch.equal(model[0](ids), before[0]) and torch.equal(model[1](x), before[1])
    perturb(model)
    assert sites(model)["0"].edit_module(method).A.dtype == torch.float32
    emb, conv = model[0](ids), model[1](x)
    assert emb.dtype == conv.dtype == torch.bfloat16
    rewrite(model, "merge")
    torch.testing.assert_close(model[0](ids), emb, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(model[1](x), conv, rtol=2e-2, atol=2e-2)


class Mixed(nn.Module):
    """An Embedding, a Conv1d, a Conv2d and a Linear: every LoRA/DoRA layer kind in one graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.c1 = nn.Embedding(20, 8, padding_idx=0), nn.Conv1d(8, 8, 3, padding=1)
        self.c2, self.out = nn.Conv2d(8, 4, 3, padding=1), nn.Linear(4, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.c1(self.emb(ids).transpose(1, 2))  # [n, 8, L]
        h = self.c2(h.unsqueeze(-1)).squeeze(-1)  # [n, 4, L]
        return self.out(h.transpose(1, 2))


def test_every_layer_kind_dora_and_pissa_compile_in_one_graph() -> None:
    import torch._dynamo
    from test_compile import assert_compiles_like_eager
    from torch._dynamo.utils import counters

    model = Mixed()
    rewrite(
        model,
        "apply dora(r=2) to emb, c2\napply lora(r=2) to c1\napply lora(r=2, init=pissa) to out",
    )
    perturb(model)
    ids = torch.tensor([[0, 3, 5, 19], [1, 2, 0, 4]])
    torch._dynamo.reset()
    counters.clear()
    try:  # dynamo's capture is what this checks: the eager backend
        assert_compiles_like_eager(model, lambda m: m(ids), backend_name="eager")
    finally:
        torch._dynamo.reset()


def test_streaming_checkpoint_merge_agrees_with_the_in_memory_merge(tmp_path) -> None:
    """The checkpoint merge goes through the same pure `merged`: embedding LoRA, embedding
    DoRA and a PiSSA-initialized projection, merged from files, equal the in-memory merge."""
    from safetensors import safe_open

    from surgery.io import write_adapter_dir
    from surgery.io.checkpoint import merge_checkpoint

    tiny("llama").save_pretrained(tmp_path / "base")
    model = tiny("llama").eval()
    rules = (
        "apply lora(r=2) to model.embed_tokens\n"
        "apply dora(r=2) to model.embed_tokens as d\n"
        "apply lora(r=2, init=pissa) to model.layers.0.self_attn.q_proj"
    )
    with pytest.raises(PlanError, match="first edit"):  # dora reads the table's own weight
        rewrite(copy.deepcopy(model), rules)
    rules = "\n".join(rules.splitlines()[1:])
    report = rewrite(model, rules)
    perturb(model)
    write_adapter_dir(model, tmp_path / "adapter", rules_text=rules, plan=report.plan)
    unmerged = model(IDS).logits
    rewrite(model, "merge")
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", progress=False)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        streamed = {k: f.get_tensor(k) for k in f.keys()}
    merged = model.state_dict()
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"} <= set(streamed)
    for key, tensor in streamed.items():
        torch.testing.assert_close(tensor, merged[key], rtol=1e-6, atol=1e-6)
