"""The virtual-token methods in PEFT's format: PROMPT_TUNING, P_TUNING and PREFIX_TUNING.

PEFT saves one tensor, `prompt_embeddings`, holding the *final* table: P-tuning's encoder and
prefix tuning's MLP are run once and their output saved (`inference_mode` then loads it as a
plain table). surgery's rows are laid out the same way (a prefix row: for each layer its key
then its value, `kv_heads × head_dim` each), so export bakes the encoder the way `merge` does,
and import gives the plain-table method that computes exactly what PEFT computes from that
table: `prompt` for PROMPT_TUNING and P_TUNING, `p_tuning_v2` for PREFIX_TUNING. Refused:
encoder-decoder adapters (`num_transformer_submodules` 2) and a missing or non-2-d table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.edit import Edit, tensor_key
from surgery.hf import cache_geometry
from surgery.methods import REGISTRY
from surgery.methods.codec import COUNT, PeftFormatError, check_fields, register_codec

TABLE = "prompt_embeddings"


class VirtualTokenCodec:
    def __init__(self, method: str, peft_type: str, imports_as: str):
        self.method, self.peft_type = method, peft_type
        self.imports_as = imports_as  # the plain-table statement PEFT's table imports as

    def export(
        self, edits: list[Edit], tensors: dict[str, torch.Tensor], model: nn.Module
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        (edit,) = edits  # io allows one edit per place, and these sit on the model itself
        args = edit.args()
        table = baked_table(edit, tensors, REGISTRY[edit.method].encoder(model, args))
        config = model.config
        fields: dict[str, Any] = {
            "peft_type": self.peft_type,
            "num_virtual_tokens": int(table.shape[0]),
            "num_transformer_submodules": 1,
            "num_layers": config.num_hidden_layers,
            "token_dim": int(model.get_input_embeddings().weight.shape[1]),
            "num_attention_heads": config.num_attention_heads,
        }
        if self.peft_type == "PREFIX_TUNING":
            _, kv_heads, head_dim = cache_geometry(config)
            fields |= {
                "num_attention_heads": kv_heads,  # PEFT views a key as [heads, token_dim / heads]
                "token_dim": kv_heads * head_dim,
                "prefix_projection": bool(args.get("reparam")),
                "encoder_hidden_size": args.get("hidden") or fields["token_dim"],
            }
        elif self.peft_type == "P_TUNING":
            fields |= {
                "encoder_reparameterization_type": args["encoder"].upper(),
                "encoder_hidden_size": args["hidden"] or fields["token_dim"],
                "encoder_num_layers": 2,
                "encoder_dropout": 0.0,
            }
        else:
            fields |= {
                "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None,
            }
        return fields, {TABLE: table.contiguous()}

    def import_(
        self, config: dict[str, Any], tensors: dict[str, torch.Tensor], module_names: list[str]
    ) -> tuple[str, dict[str, torch.Tensor]]:
        check_fields(config, {"num_virtual_tokens": COUNT, "num_transformer_submodules": COUNT})
        kind = config["peft_type"]
        table = tensors.get(TABLE)
        if table is None or table.dim() != 2 or len(tensors) != 1:
            raise PeftFormatError(
                f"a PEFT {kind} adapter holds one 2-d `{TABLE}` tensor; this one does not"
            )
        if int(config.get("num_transformer_submodules") or 1) != 1:
            raise PeftFormatError(
                f"PEFT {kind} adapters of encoder-decoder models are not supported"
            )
        method = self.imports_as
        statement = f"use auto\napply {method}(n={int(table.shape[0])}) to "
        statement += "embed" if method == "prompt" else "layers.*"
        return statement, {tensor_key("", method, "embedding"): table}


def baked_table(
    edit: Edit, tensors: dict[str, torch.Tensor], encoder: nn.Module | None
) -> torch.Tensor:
    """The rows the model sees: the saved table, through its encoder when it has one."""
    table = tensors[tensor_key(edit.path, edit.name, "embedding")]
    prefix = tensor_key(edit.path, edit.name, "encoder.")
    own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not own:
        return table
    assert encoder is not None
    encoder.load_state_dict(own)
    with torch.no_grad():
        return encoder.to(table.dtype)(table).detach()


# the plain-table method of a type registers last: it is the one its PEFT type imports as
for _method, _peft_type, _imports_as in (
    ("p_tuning", "P_TUNING", "prompt"),
    ("prompt", "PROMPT_TUNING", "prompt"),
    ("prefix", "PREFIX_TUNING", "p_tuning_v2"),
    ("p_tuning_v2", "PREFIX_TUNING", "p_tuning_v2"),
):
    register_codec(VirtualTokenCodec(_method, _peft_type, _imports_as))
