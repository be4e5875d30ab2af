"""Generation for many requests, each through its own adapter: `surgery generate` and its Python
side.

A request names an adapter (or none: the base model) and gives a prompt, as text when there is
a tokenizer, as token ids otherwise. Requests run in batches of mixed adapters
(`model.generate(..., adapter_names=[...])`, left padding with an attention mask), one batched
computation per site. When an adapter is built from a method that cannot route per row, the
requests run instead in batches of one adapter each (`set_active`), and the run says so: every
request still gets exactly its adapter's output, never another's.

`requests` (reading and checking request lines), `tokenizer` (loading one safely),
`generation` (the batches).
"""

from surgery.serve.generation import (
    MIXED,
    PER_ADAPTER,
    Result,
    Run,
    Sampling,
    generate_requests,
    write_results,
)
from surgery.serve.requests import Request, RequestError, encode, parse_requests, read_requests
from surgery.serve.tokenizer import TOKENIZER_FILES, has_tokenizer, load_tokenizer

__all__ = [
    "MIXED",
    "PER_ADAPTER",
    "TOKENIZER_FILES",
    "Request",
    "RequestError",
    "Result",
    "Run",
    "Sampling",
    "encode",
    "generate_requests",
    "has_tokenizer",
    "load_tokenizer",
    "parse_requests",
    "read_requests",
    "write_results",
]
