"""Shared fixtures: small seeded models built from configs (no hub access needed)."""

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
