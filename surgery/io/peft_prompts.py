"""PEFT's format for the virtual-token methods: PROMPT_TUNING, P_TUNING and PREFIX_TUNING.

PEFT saves one tensor, `prompt_embeddings`, holding the *final* table: P-tuning's encoder and
prefix tuning's MLP are run once and their output saved (`inference_mode` then loads it as a
plain table). surgery's rows are laid out the same way (a prefix row: for each layer its key
then its value, `kv_heads × head_dim` each), so export bakes the encoder the way `merge` does and
import gives the plain-table method: `prompt` for PROMPT_TUNING and P_TUNING, `p_tuning_v2`
for PREFIX_TUNING. Both compute exactly what PEFT computes from that table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from surgery.edit import Edit

VIRTUAL_TOKEN_TYPES = {
    "prompt": "PROMPT_TUNING",
    "p_tuning": "P_TUNING",
    "prefix": "PREFIX_TUNING",
    "p_tuning_v2": "PREFIX_TUNING",
}
IMPORTED_AS = {  # PEFT type -> the surgery statement that computes the same from the table
    "PROMPT_TUNING": "apply prompt(n={n}) to embed",
    "P_TUNING": "apply prompt(n={n}) to embed",
    "PREFIX_TUNING": "apply p_tuning_v2(n={n}) to layers.*",
}
TABLE = "prompt_embeddings"


def export_virtual_tokens(
    edit: Edit, tensors: dict[str, torch.Tensor], model: nn.Module | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT's adapter_config fields and weights for one model-level edit."""
    from surgery.hf import cache_geometry
    from surgery.methods import REGISTRY

    if model is None:
        raise SurgeryError(
            "exporting a virtual-token edit needs the model's config, which this adapter "
            "directory does not record",
            hint="save the adapter again with `surgery apply --out` on the model",
        )
    method = REGISTRY[edit.method]
    table = baked_table(edit, tensors, method.encoder(model, edit.args()))
    config = model.config
    kind = VIRTUAL_TOKEN_TYPES[edit.method]
    fields: dict[str, Any] = {
        "peft_type": kind,
        "num_virtual_tokens": int(table.shape[0]),
        "num_transformer_submodules": 1,
        "num_layers": config.num_hidden_layers,
        "token_dim": int(model.get_input_embeddings().weight.shape[1]),
        "num_attention_heads": config.num_attention_heads,
    }
    if kind == "PREFIX_TUNING":
        _, kv_heads, head_dim = cache_geometry(config)
        fields |= {
            "num_attention_heads": kv_heads,  # PEFT views each key as [heads, token_dim / heads]
            "token_dim": kv_heads * head_dim,
            "prefix_projection": bool(edit.args().get("reparam")),
            "encoder_hidden_size": edit.args().get("hidden") or fields["token_dim"],
        }
    elif kind == "P_TUNING":
        fields |= {
            "encoder_reparameterization_type": edit.args()["encoder"].upper(),
            "encoder_hidden_size": edit.args()["hidden"] or fields["token_dim"],
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


def baked_table(
    edit: Edit, tensors: dict[str, torch.Tensor], encoder: nn.Module | None
) -> torch.Tensor:
    """The rows the model sees: the saved table, through its encoder when it has one."""
    prefix = f"{edit.name}."
    table = tensors[f"{prefix}embedding"]
    own = {
        k[len(prefix) + len("encoder.") :]: v
        for k, v in tensors.items()
        if k.startswith(f"{prefix}encoder.")
    }
    if not own:
        return table
    assert encoder is not None
    encoder.load_state_dict(own)
    with torch.no_grad():
        return encoder.to(table.dtype)(table).detach()


def import_virtual_tokens(
    config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The statement (after `use auto`) and weights computing what PEFT computes."""
    kind = config["peft_type"]
    table = tensors.get(TABLE)
    if table is None or table.dim() != 2:
        raise SurgeryError(f"a PEFT {kind} adapter holds a 2-d `{TABLE}` tensor; this one does not")
    if int(config.get("num_transformer_submodules") or 1) != 1:
        raise SurgeryError(f"PEFT {kind} adapters of encoder-decoder models are not supported")
    n = int(table.shape[0])
    statement = "use auto\n" + IMPORTED_AS[kind].format(n=n)
    method = statement.split("apply ")[1].split("(")[0]
    return [statement], {f"{method}.embedding": table}
