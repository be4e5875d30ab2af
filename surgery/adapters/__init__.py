"""Adapters: named units of edits, several per model, used one at a time, summed, or per row.

`names` (what an adapter may be called), `state` (which adapters a model holds and which are
active, kept on the model), `units` (list, activate, disable), `router` (`adapter_names=`:
each row of a batch through its own adapter, as one batched computation per site). The public
functions are re-exported from `surgery`.
"""
