"""rpgrl.models.kv_cache: decoding with reserved room gives the plain DynamicCache's logits."""

from __future__ import annotations

import pytest
import torch

from hf_tiny import tiny_causal_lm
from rpgrl.models.kv_cache import ReservedLayer, decoding_cache
from rpgrl.models.prefix import call_with_cache, new_cache, positions


def _decode_logits(model, cache, steps: int) -> list[torch.Tensor]:
    """Prefill two left-padded prompts, repeat each 3x, then decode ``steps`` greedy tokens,
    dropping rows 1 and 4 after the second step (the loop's compaction): every step's logits."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = call_with_cache(model, cache, input_ids=ids, attention_mask=mask, position_ids=positions(mask))
    cache.batch_repeat_interleave(3)
    logits = out.logits[:, -1].repeat_interleave(3, 0)
    mask, last = mask.repeat_interleave(3, 0), positions(mask)[:, -1].repeat_interleave(3, 0)
    seen = [logits]
    for step in range(steps):
        nxt = logits.argmax(-1)
        if step == 2:
            keep = torch.tensor([0, 2, 3, 5])
            cache.batch_select_indices(keep)
            nxt, mask, last = nxt[keep], mask[keep], last[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        last = last + 1
        logits = call_with_cache(model, cache, input_ids=nxt[:, None], attention_mask=mask,
                                 position_ids=last[:, None]).logits[:, -1]
        seen.append(logits)
    return seen


@pytest.mark.parametrize("room", [2, 16])  # 2: the buffers fill up and grow twice within 6 steps
@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral_sliding"])
def test_reserved_cache_gives_the_plain_caches_logits(arch, room):
    model = tiny_causal_lm(arch).double()
    with torch.no_grad():
        want = _decode_logits(model, new_cache(model), 6)
        cache = decoding_cache(model, room)
        got = _decode_logits(model, cache, 6)
    reserved = [isinstance(layer, ReservedLayer) for layer in cache.layers]
    assert all(reserved) == (arch != "mistral_sliding")  # sliding-window layers keep their own kind
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    if all(reserved):
        layer = cache.layers[0]
        assert layer.keys.shape[-2] == 5 + 6 and layer._k.shape[-2] >= layer.keys.shape[-2]
        assert layer.keys.data_ptr() == layer._k.data_ptr()  # a view: nothing concatenated
