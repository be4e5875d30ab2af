"""Shared fixtures and helpers: small seeded models built from configs (no hub access needed)."""

from __future__ import annotations

import pytest
import torch

from surgery.models import tiny


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny("llama")


@pytest.fixture
def falcon() -> torch.nn.Module:
    return tiny("falcon")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest on one thread; on a busy machine OpenMP spinning costs up to 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_losses(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 30
) -> list[float]:
    """Losses of a short deterministic run on a repeating 8-token pattern (a wiring check)."""
    batch = (torch.arange(32) % 8).repeat(4, 1)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def edit_modules(model: torch.nn.Module):
    """(method name, edit module) for every edit on every site of `model`."""
    from surgery import Site

    for site in model.modules():
        if isinstance(site, Site):
            for edit in site.edits:
                yield edit.method, site.edit_module(edit.name)
