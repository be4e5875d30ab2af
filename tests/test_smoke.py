"""The README's 30-second tour, as a test."""

import torch

from surgery import Site, rewrite


def test_tour_apply_train_merge(llama: torch.nn.Module) -> None:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    before = llama(ids).logits
    report = rewrite(llama, "apply lora(r=4) to *.self_attn.<q,v>_proj")
    # per layer: q has A[4,64] B[64,4]; v has A[4,64] B[32,4] (2 KV heads of 16)
    assert report.trainable == 4 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert torch.equal(llama(ids).logits, before)
    assert isinstance(llama.model.layers[0].self_attn.q_proj, Site)
    rewrite(llama, "merge")
    assert not any(isinstance(m, Site) for m in llama.modules())
