"""A target whose tensors an ancestor's forward reads as values is refused: some path there (a
fused fast path) skips calling it, so an edit on it would be bypassed and a merge would change
the outputs. Reads of metadata only (`.dtype`, `.shape`, `isinstance`) are fine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from surgery import PlanError, rewrite
from surgery.graph.site import Site
from surgery.models import tiny
from surgery.parent_calls import uncalled_reason

X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return list(now) == list(before) and all(torch.equal(now[k], v) for k, v in before.items())


def perturb_adapters(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ".lora." in f".{name}.":
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("target", ["linear1", "linear2"])
def test_encoder_layer_feed_forward_is_refused_for_its_fast_path(target: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0))
    before = state(model)
    with pytest.raises(PlanError) as caught:
        rewrite(model, f"apply lora to 0.{target}")
    message = caught.value.message
    assert f"TransformerEncoderLayer reads {target}.weight" in message
    assert f"an edit on {target} would be bypassed" in message
    assert unchanged(model, before) and not isinstance(getattr(model[0], target), Site)


def test_decoder_layer_feed_forward_is_accepted_and_acts_in_eval_too() -> None:
    """`nn.TransformerDecoderLayer` has no fused path of its own: it always calls linear1/2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, dropout=0.0))
    memory = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model[0](X, memory)
    rewrite(model, "apply lora(r=2) to 0.linear1, 0.linear2")
    perturb_adapters(model)
    with torch.no_grad():
        evaluated = model.eval()[0](X, memory)
        trained = model.train()[0](X, memory)
    assert (evaluated - base).abs().max() > 1e-3
    torch.testing.assert_close(evaluated, trained)


class FastPath(nn.Module):
    """Calls `proj` when training, reads its weight directly otherwise (like a fused kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.proj(x)
        return F.linear(x, self.proj.weight, self.proj.bias)


class HelperFastPath(FastPath):
    """The direct read sits in a helper that `forward` reaches through `self`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) if self.training else self._fused(x)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.weight.t() + self.proj.bias


class InheritedFastPath(FastPath):
    """The direct read is in the base's forward, reached through `super()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


@pytest.mark.parametrize("parent", [FastPath, HelperFastPath, InheritedFastPath])
def test_parent_that_calls_and_reads_the_weight_is_refused(parent: type[nn.Module]) -> None:
    model = parent()
    before = state(model)
    with pytest.raises(PlanError, match=r"reads proj\.weight, proj\.bias directly") as caught:
        rewrite(model, "apply lora(r=2) to proj")
    assert caught.value.hint is not None and "always called" in caught.value.hint
    assert unchanged(model, before) and not isinstance(model.proj, Site)


class GrandparentReads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = FastPathFree()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.block(x)
        return torch.addmm(self.block.proj.bias, x, self.block.proj.weight.t())


class FastPathFree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_grandparent_that_reads_the_weight_is_refused() -> None:
    model = GrandparentReads()
    before = state(model)
    with pytest.raises(
        PlanError, match=r"GrandparentReads reads block\.proj\.weight, block\.proj\.bias"
    ):
        rewrite(model, "apply lora(r=2) to block.proj")
    assert unchanged(model, before) and not isinstance(model.block.proj, Site)


class MetadataReads(nn.Module):
    """Reads only what the weight is, never its values; plus a value read outside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)
        nn.init.zeros_(self.proj.bias)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            isinstance(self.proj.weight, torch.Tensor)
            and x.dtype != self.proj.weight.dtype
            and self.proj.weight.dtype != torch.int8
        ):
            x = x.to(self.proj.weight.dtype)
        assert x.shape[-1] == self.proj.weight.shape[1] == self.proj.weight.size(1)
        assert self.proj.bias is not None and self.proj.weight.ndim == 2 < len(self.proj.weight)
        return self.proj(x.to(self.proj.weight.device))


def test_metadata_reads_are_accepted_and_the_edit_acts() -> None:
    torch.manual_seed(0)
    model = MetadataReads().eval()
    with torch.no_grad():
        base = model(X)
    rewrite(model, "apply lora(r=2) to proj")
    assert isinstance(model.proj, Site)
    perturb_adapters(model)
    with torch.no_grad():
        assert (model(X) - base).abs().max() > 1e-3


def test_t5_wo_is_accepted() -> None:
    """T5's feed-forward checks `isinstance(self.wo.weight, ...)` and its dtype: metadata."""
    model = tiny("t5")
    ff = model.encoder.block[0].layer[1].DenseReluDense
    assert uncalled_reason(ff, "wo", ff.wo) is None
    rewrite(model, "apply lora(r=2) to encoder.block.0.layer.1.DenseReluDense.wo")
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, Site)
