"""The cells a server runs: prefill (prompt -> logits of its last position + attention caches) and decode
(new tokens + caches of a fixed maximum length -> logits + updated caches). They compile in GRAPH mode and are
what ``mindpangu.export`` writes to MindIR, so the Python path and the exported files run the same graph.

Caches are stacked over layers, ``[L, B, M, D]``: D = kv_lora_rank + qk_rope_head_dim for MLA (the compressed
latent and the shared rope key), 2 * kv_heads * head_dim for GQA (roped K, then V).
"""
from __future__ import annotations

from mindspore import nn


class PrefillStep(nn.Cell):
    """input_ids [B, S] int32 -> (logits of the last position [B, V], caches [L, B, S, D])
    (+ the residual stream [B, S, H] between them with ``hidden=True``, for MTP drafting)."""

    def __init__(self, model, hidden: bool = False):
        super().__init__(auto_prefix=False)  # wrapping must not rename the model's parameters
        self.model, self.hidden = model, hidden

    def construct(self, input_ids):
        normed, h, caches = self.model.model.cached(input_ids)
        logits = self.model.logits(normed[:, -1:])[:, 0]
        if self.hidden:
            return logits, h, caches
        return logits, caches


class DecodeStep(nn.Cell):
    """input_ids [B, Q] int32 at positions [B, Q] int32, caches [L, B, M, D] -> (logits [B, Q, V], caches)
    (+ the residual stream [B, Q, H] between them with ``hidden=True``)."""

    def __init__(self, model, hidden: bool = False):
        super().__init__(auto_prefix=False)  # wrapping must not rename the model's parameters
        self.model, self.hidden = model, hidden

    def construct(self, input_ids, positions, caches):
        logits, h, caches = self.model.decode(input_ids, positions, caches)
        if self.hidden:
            return logits, h, caches
        return logits, caches


class DraftStep(nn.Cell):
    """The first MTP layer: (main residual h [B, Q, H], next tokens [B, Q], positions [B, Q], its cache
    [B, M, D]) -> (logits [B, Q, V] for the token after next, cache)."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # wrapping must not rename the model's parameters
        self.model = model

    def construct(self, h, next_ids, positions, cache):
        return self.model.draft(h, next_ids, positions, cache)
