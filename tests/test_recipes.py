"""Selective fine-tuning recipes written with freeze / unfreeze (docs/methods.md)."""

from __future__ import annotations

import pytest
import torch

from surgery import ResolveError, rewrite
from surgery.models import from_config, preset_config, tiny

BITFIT = "freeze **\nunfreeze **.bias"


def test_bitfit_trains_exactly_the_biases() -> None:
    config = preset_config("tiny-falcon")
    config.bias = True
    model = from_config(config)
    report = rewrite(model, BITFIT)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable)
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters()
                                   if n.endswith(".bias"))


def test_bitfit_on_a_model_without_biases_is_a_clear_error_and_changes_nothing() -> None:
    model = tiny("llama")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ResolveError) as info:
        rewrite(model, BITFIT)
    assert "no module or parameter in the model is named 'bias'" in str(info.value)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_top_k_layers_and_head() -> None:
    model = tiny("llama")
    rewrite(model, "freeze **\nunfreeze model.layers[-2:], ^lm_head")
    trainable = {n.split(".")[2] if n.startswith("model.layers.") else n
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"2", "3", "lm_head.weight"}
    ids = torch.arange(8).unsqueeze(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is None
    assert model.model.layers[3].mlp.up_proj.weight.grad is not None
