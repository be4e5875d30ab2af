"""P-tuning (Liu et al. 2021, arXiv:2103.10385): prompt tuning whose virtual tokens come from a
small prompt encoder (an MLP, or a bidirectional LSTM followed by an MLP) over a trainable table.

The encoder only eases training: `merge` runs it once and keeps its output as a plain prompt
table (the encoder is dropped), so inference costs what prompt tuning costs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.methods import register
from surgery.methods._virtual_tokens import N_PARAM, hidden_param
from surgery.methods.base import Param, Problem
from surgery.methods.prompt import PromptAdapter, PromptTuning, input_embedding_problem


class LSTMEncoder(nn.Module):
    """Bidirectional 2-layer LSTM over the virtual tokens, then a 2-layer MLP back to hidden."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width)
        )

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.lstm(table.unsqueeze(0))[0]).squeeze(0)


@register
class PTuning(PromptTuning):
    name = "p_tuning"
    summary = "virtual token embeddings produced by a prompt encoder (MLP or LSTM); merge bakes"
    paper = "Liu et al. 2021, GPT Understands, Too (arXiv:2103.10385)"
    params = (
        N_PARAM,
        Param("encoder", str, "mlp", "the prompt encoder", choices=("mlp", "lstm")),
        hidden_param("width of the prompt encoder"),
    )

    def encoder(self, model: nn.Module, args: dict[str, Any]) -> nn.Module | None:
        width = self.table_width(model, args)
        hidden = args["hidden"] or width
        if args["encoder"] == "lstm":
            return LSTMEncoder(width, hidden)
        return nn.Sequential(
            nn.Linear(width, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, width),
        )

    def check_placement(
        self, model: nn.Module, selected: list[tuple[str, nn.Module]], args: dict[str, Any]
    ) -> Problem | None:
        return input_embedding_problem(self.name, model, selected)

    def build(self, model: nn.Module, args: dict[str, Any]) -> nn.Module:
        table = self.new_table(model, args)
        encoder = self.encoder(model, args).to(device=table.device, dtype=table.dtype)
        if not table.is_meta:
            with torch.no_grad():
                nn.init.normal_(table)
        options = self.adapter_options(model, args)
        return PromptAdapter(table, encoder, options)
