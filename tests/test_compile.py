"""`torch.compile` of rewritten models: one graph, no graph break, no recompilation, eager results.

Every site-level method in the registry is compiled with `fullgraph=True` (a graph break is an
error); a method added without a rule here fails `test_every_site_method_has_a_rule`. Forward
outputs and the gradients of every trainable tensor must equal eager ones, and a second call with
the same shapes must reuse the compiled frame. The registry-wide tests use a small torch block
(dynamo spends seconds in a Hugging Face model's own code); whole HF models are compiled for LoRA
on Llama and fused-part LoRA on GPT-2. The method tests use the `aot_eager` backend, which traces
the joint forward/backward graph as inductor would without generating kernels; the HF and
merge/remove tests use `eager` (half the time: dynamo's capture is what they check).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from placement_cases import assert_every_placement_decided, methods_of, moe
from test_load import fill  # non-zero trainables: LoRA's B = 0 would hide the branch
from torch import fx, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from surgery import Site, rewrite
from surgery.graph.param_site import PARAM, ParamSite
from surgery.graph.placement import MODEL, SITE
from surgery.models import from_config, preset_config

D, HIDDEN, VOCAB = 16, 32, 256
X = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(7))
IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(7))

# One rule per site-level method on `Block` (options that take a second code path where a method
# has one: IA3 on the input).
RULES = {
    "lora": "apply lora(r=4, alpha=8) to attn.<q,v>",
    "ia3": "apply ia3 to attn.<k,v>\napply ia3(on=input) to mlp.down",
    "dora": "apply dora(r=4, alpha=16) to attn.<q,v>",
    "adapter": "apply adapter(r=4) to mlp",
    "parallel_adapter": "apply parallel_adapter(r=4) to mlp",
    "sparse": "apply sparse(fraction=0.1) to mlp.down",
    "loha": "apply loha(r=2, alpha=4) to attn.<q,v>",
    # factored W1 and W2 on q and v; full W1 and W2 on down
    "lokr": "apply lokr(r=1, decompose_both=true) to attn.<q,v>\napply lokr(r=4) to mlp.down",
    "oft": "apply oft(block_size=8) to attn.<q,v>\n"
    "apply oft(r=2, share=true, cayley=exact, coft=true, eps=0.1) to mlp.down",
    # two statements: two projections, one of them sized by the wider mlp.up
    "vera": "apply vera(r=4, d_initial=0.5) to attn.<q,v>\n"
    "apply vera(r=2, seed=3) to mlp.<up,down> as vera2",
    "trained_copy": "apply trained_copy to mlp.down\napply lora(r=2) to mlp.down",
    "trainable_tokens": "apply trainable_tokens(ids=[25, 7, 185]) to embed",
}
SITE_METHODS = methods_of(SITE)


def test_every_placement_is_tested() -> None:
    """Site, model-level and parameter methods each have their compile test below."""
    assert_every_placement_decided((SITE, MODEL, PARAM), {})


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / D**0.5
        return self.o(scores.softmax(-1) @ self.v(x))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """A transformer-like block of plain torch modules; q and v have one shape, so their sites
    share a template inside the compiled graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn, self.mlp = Attention(), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch: no cached frames or counters from another test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def one_layer_hf(family: str) -> nn.Module:
    config = preset_config(f"tiny-{family}")
    config.update({"n_layer" if family == "gpt2" else "num_hidden_layers": 1})
    return from_config(config)


def sites(model: nn.Module) -> list[Site]:
    return [m for m in model.modules() if isinstance(m, Site)]


Call = Callable[[nn.Module], torch.Tensor]


def plain(model: nn.Module) -> torch.Tensor:
    return model(X)


def logits(model: nn.Module) -> torch.Tensor:
    return model(IDS).logits


def run(model: nn.Module, module: nn.Module, call: Call) -> tuple[torch.Tensor, dict]:
    """`call(module)`'s output and the gradient of every trainable tensor of `model` (the module
    or its compiled wrapper) for a fixed loss."""
    model.zero_grad(set_to_none=True)
    out = call(module)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def assert_compiles_like_eager(
    model: nn.Module, call: Call = plain, backend_name: str = "aot_eager", frames: int = 1
) -> None:
    """Compiled with fullgraph=True: outputs and gradients equal eager, `frames` frames compiled
    once each, no graph break, and a second call with the same shapes recompiles nothing."""
    expected, expected_grads = run(model, model, call)
    assert expected_grads, "the rule trains nothing: the gradient check would be empty"
    backend = CompileCounterWithBackend(backend_name)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for _ in range(2):
        out, grads = run(model, compiled, call)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert backend.frame_count == frames  # the second call reused the first compilation
    assert not counters["graph_break"]
    assert not counters["recompiles"]


# ---- every site-level method -----------------------------------------------------------------


def test_every_site_method_has_a_rule() -> None:
    missing = sorted(set(SITE_METHODS) - set(RULES))
    assert not missing, f"add a rule to RULES for: {', '.join(missing)}"


class Embedded(nn.Module):
    """`Block` over a token embedding, for methods that attach to an Embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.block = nn.Embedding(VOCAB, D), Block()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(ids))


def tokens(model: nn.Module) -> torch.Tensor:
    return model(IDS)


ON_TOKENS = {"trainable_tokens"}  # methods whose rule targets `Embedded` (25 and 185 occur in IDS)


@pytest.mark.parametrize("method", SITE_METHODS)
def test_site_method_compiles_in_one_graph(method: str) -> None:
    if method not in RULES:
        pytest.fail(f"no rule for method '{method}'")
    model, call = (Embedded(), tokens) if method in ON_TOKENS else (Block(), plain)
    rewrite(model, RULES[method])
    assert any(e.method == method for s in sites(model) for e in s.edits)
    fill(model)
    assert_compiles_like_eager(model, call)


def test_two_edits_stacked_on_one_site_compile() -> None:
    model = Block()
    rewrite(model, "apply ia3(on=input) to attn.<q,v>\napply lora(r=2) to attn.<q,v>")
    q, v = sites(model)
    assert len(q.edits) == 2 and type(q) is type(v)  # one shared template, called twice
    fill(model)
    assert_compiles_like_eager(model)


# ---- whole Hugging Face models -----------------------------------------------------------------


def test_lora_on_a_llama_model_compiles() -> None:
    model = one_layer_hf("llama")
    rewrite(model, "apply lora(r=4) to *.self_attn.<q,v>_proj")
    fill(model)
    assert_compiles_like_eager(model, logits, "eager")


def test_lora_on_fused_parts_of_gpt2_compiles() -> None:
    model = one_layer_hf("gpt2")
    rewrite(model, "use auto\napply lora(r=2) to attn.q, attn.v")
    assert [s.edits[0].method for s in sites(model)] == ["lora"]  # one site: c_attn[q, v]
    fill(model)
    assert_compiles_like_eager(model, logits, "eager")


MODEL_LEVEL_RULES = {
    "prompt": "apply prompt(n=3) to embed",
    "p_tuning": "apply p_tuning(n=3) to embed",
    "prefix": "apply prefix(n=3) to layers.*",
    "p_tuning_v2": "apply p_tuning_v2(n=3) to layers.*",
    "infix": "apply infix(n=3) to embed",
}
MODEL_LEVEL_METHODS = methods_of(MODEL)
# hooks that run eagerly (torch.compiler.disable): infix's reads the data to find each row's
# column, so the model's forward is the one compiled frame
EAGER_HOOKS = {"infix"}


@pytest.mark.parametrize("method", MODEL_LEVEL_METHODS)
def test_virtual_token_method_compiles(method: str) -> None:
    """Two frames: torch.compile runs a module's hooks outside the compiled forward, so the
    model-level edit's forward pre-hook (where the virtual tokens enter) is a frame of its own
    (none for a hook that runs eagerly)."""
    if method not in MODEL_LEVEL_RULES:
        pytest.fail(f"no rule for method '{method}' in MODEL_LEVEL_RULES")
    model = one_layer_hf("falcon")
    rewrite(model, "use falcon\n" + MODEL_LEVEL_RULES[method])
    fill(model)
    assert_compiles_like_eager(model, logits, "eager", frames=1 if method in EAGER_HOOKS else 2)


# ---- parameter methods (MoE expert parameters) ------------------------------------------------

PARAMETER_RULES = {
    "lora_experts": "apply lora(r=2, alpha=4) to *.experts.gate_up_proj[0, 2], *.experts.down_proj",
    "ia3_experts": "apply ia3 to *.experts.gate_up_proj\n"
    "apply ia3(on=input) to *.experts.down_proj[1:]",
}


class EditedValues(nn.Module):
    """A parameter site's edited weights, flattened into one tensor: the part of its forward
    that is the edits' own (the experts module's routing loop branches on data, as it always
    did, so the whole MoE block is no single graph)."""

    def __init__(self, site: ParamSite) -> None:
        super().__init__()
        self.site = site

    def forward(self) -> torch.Tensor:
        return torch.cat([value.flatten() for value in self.site.values().values()])


@pytest.mark.parametrize("method", methods_of(PARAM))
def test_parameter_method_compiles(method: str) -> None:
    """The edited weights compile in one graph (fullgraph) with eager values and gradients; the
    experts module then reads them as it reads its own weights (the whole compiled Mixtral, with
    its loop's graph breaks, is tests/test_moe_experts.py's)."""
    if method not in PARAMETER_RULES:
        pytest.fail(f"no rule for method '{method}' in PARAMETER_RULES")
    model = moe()
    rewrite(model, PARAMETER_RULES[method])
    fill(model)
    (site,) = [m for m in model.modules() if isinstance(m, ParamSite)]
    assert {k.method for _, held in site.edited() for k in held.keys} == {method}
    assert_compiles_like_eager(EditedValues(site), lambda m: m())


# ---- merge and remove after compiling ----------------------------------------------------------


@pytest.mark.parametrize("take_out", ["merge", "remove"])
def test_merge_and_remove_after_compiling(take_out: str) -> None:
    model = Block()
    with torch.no_grad():
        original = model(X)
    rewrite(model, "apply lora(r=2) to attn.<q,v>\napply ia3 to mlp.down")
    fill(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        edited = compiled(X)
        rewrite(model, take_out)
        assert not sites(model)
        after = compiled(X)  # the guards see the replaced modules: a fresh graph, not a stale one
        torch.testing.assert_close(after, model(X), rtol=0, atol=0)
        torch.testing.assert_close(after, edited if take_out == "merge" else original)


# ---- what a site carries ---------------------------------------------------------------------


def a_site() -> Site:
    model = Block()
    rewrite(model, "apply lora(r=2) to attn.q")
    return sites(model)[0]


def test_site_carries_every_attribute_of_a_graph_module() -> None:
    """Sites skip GraphModule.__init__ and recompile (templates are shared), so they must set
    what those set themselves; a real GraphModule over the same graph says what that is."""
    site = a_site()
    real = fx.GraphModule(site, site.graph)
    missing = set(vars(real)) - set(vars(nn.Module())) - set(vars(site))
    assert not missing, f"sites lack GraphModule attributes: {sorted(missing)}"
    assert site._lineno_map == real._lineno_map
    assert site.code == real.code


def test_private_names_are_not_answered_by_the_base_module() -> None:
    site = a_site()
    site.base._marker = 1  # e.g. a hook or framework flag on the wrapped Linear
    with pytest.raises(AttributeError):
        site._marker  # noqa: B018
    assert site.in_features == site.base.in_features == D  # public attributes still fall through
    assert site.weight is site.base.weight
