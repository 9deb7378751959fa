"""The cells a server runs. They compile in GRAPH mode and are what ``mindpangu.export`` writes to MindIR, so the
Python path and the exported files run the same graphs.

- :class:`PrefillStep`: right-padded prompts of any lengths -> logits of each prompt's last token, the residual
  stream, and the attention caches of the prompt, stacked ``[L, B, S, D]`` (D = kv_lora_rank + qk_rope_head_dim
  for MLA: the compressed latent and the shared rope key; 2 * kv_heads * head_dim for GQA: roped K, then V).
- :class:`DecodeStep`: Q new tokens per sequence at their positions -> logits. The caches live in the cell as one
  Parameter ``[B * M, D]`` per layer (``decode_cache.<layer>``; row b * M + p is sequence b's position p) and
  each step writes its Q entries in place (ScatterUpdate, as mindformers' incremental inference keeps its KV
  cache in Parameters): nothing of the cache crosses the graph boundary or is copied per token. Batch B and
  cache length M are static (what Ascend graph mode and the C++ decode kernels need). :func:`load_caches` fills
  the Parameters from a prefill.
- :class:`DraftPrefillStep` / :class:`DraftStep`: the first MTP layer over a prompt, then Q positions at a time
  with its own cache Parameter (``mtp_cache``); :class:`SpeculativeStep` verifies and drafts in one graph.

Padding rows of a prompt batch (after a prompt's last token) produce cache entries that no query sees: decode
writes position p before any query attends to it, and a query at p sees keys 0..p only. (Pad tokens do go
through the MoE router; with ``moe.capacity_factor`` set they compete for expert capacity, so batched output can
differ from one prompt alone. Serving models are dropless by default.)
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

CACHE_PREFIX = "decode_cache."
MTP_CACHE = "mtp_cache"


def last_positions(x, lengths):
    """x [B, S, H], lengths [B] int32 -> x at each row's position lengths - 1: [B, 1, H] (a one-hot batched
    matmul: exact, and valid for dynamic B and S)."""
    onehot = ops.one_hot(lengths - 1, x.shape[1], Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
    return ops.matmul(onehot.expand_dims(1), x)


class PrefillStep(nn.Cell):
    """input_ids [B, S] int32 (prompts right-padded to S), lengths [B] int32 -> (logits of each prompt's last
    token [B, V], residual stream [B, S, H], caches [L, B, S, D])."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # wrapping must not rename the model's parameters
        self.model = model

    def construct(self, input_ids, lengths):
        normed, h, caches = self.model.model.cached(input_ids)
        logits = self.model.logits(last_positions(normed, lengths))[:, 0]
        return logits, h, caches


def _zeros(shape) -> Tensor:
    return Tensor(np.zeros(shape, np.float32))


class DecodeStep(nn.Cell):
    """input_ids [B, Q] int32 at positions [B, Q] int32 -> logits [B, Q, V] (+ the residual stream [B, Q, H]
    with ``hidden=True``, which MTP drafting reads), the caches (``decode_cache.<layer>`` Parameters
    [batch * max_len, D]) updated in place. A position must be < max_len."""

    def __init__(self, model, batch: int, max_len: int, hidden: bool = False):
        super().__init__(auto_prefix=False)  # wrapping must not rename the model's parameters
        cfg = model.config
        self.model, self.hidden, self.batch, self.max_len = model, hidden, batch, max_len
        width = model.model.layers[0].self_attn.cache_width
        self.caches = ParameterTuple(Parameter(_zeros((batch * max_len, width)), name=f"{CACHE_PREFIX}{i}",
                                               requires_grad=False) for i in range(cfg.num_layers))

    def construct(self, input_ids, positions):
        logits, h, _ = self.model.decode(input_ids, positions, self.caches)
        if self.hidden:
            return logits, h
        return logits


class DraftPrefillStep(nn.Cell):
    """The first MTP layer over a prompt: (main residual h [B, S, H], the next token of each position
    next_ids [B, S]) -> (logits [B, S, V] for the token after next, its cache entries [B, S, D])."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, h, next_ids):
        return self.model.draft(h, next_ids)


class DraftStep(nn.Cell):
    """The first MTP layer at Q positions: (main residual h [B, Q, H], next tokens [B, Q], positions [B, Q]) ->
    logits [B, Q, V] for the token after next, its cache (``mtp_cache`` [batch * max_len, D]) updated in place."""

    def __init__(self, model, batch: int, max_len: int):
        super().__init__(auto_prefix=False)
        self.model = model
        width = model.model.mtp_layers[0].self_attn.cache_width
        self.cache = Parameter(_zeros((batch * max_len, width)), name=MTP_CACHE, requires_grad=False)

    def construct(self, h, next_ids, positions):
        logits, _ = self.model.draft(h, next_ids, positions, self.cache)
        return logits


class SpeculativeStep(nn.Cell):
    """One greedy MTP speculative step in one graph: (ids [1, 2] = [newest token t, draft d], positions [1, 2] =
    [p, p + 1]) -> int32 [3]: the main model's greedy tokens after t and after d, and the next draft.

    The main model verifies t and d together (its caches, ``decode_cache.<layer>``, written at p and p + 1); d is
    accepted when it equals the greedy token after t. The first MTP layer (``draft``, a :class:`DraftStep`) then
    drafts at p and p + 1 from the main residual and the tokens that follow: [d, token after d] if accepted, else
    [token after t, the same] (its entry at p + 1 is then a placeholder the next step overwrites), and the next
    draft is its greedy token at p + 1 or p. One graph call per step, the same number as plain decoding.
    """

    def __init__(self, model, max_len: int):
        super().__init__(auto_prefix=False)
        self.verify = DecodeStep(model, 1, max_len, hidden=True)
        self.draft = DraftStep(model, 1, max_len)
        self.argmax = ops.Argmax(-1, ms.int32)

    def construct(self, input_ids, positions):
        logits, h = self.verify(input_ids, positions)
        best = self.argmax(logits)  # [1, 2]
        accepted = ops.equal(best[:, :1], input_ids[:, 1:])  # [1, 1]
        follow = ops.select(ops.tile(accepted, (1, 2)), ops.concat((input_ids[:, 1:], best[:, 1:]), 1),
                            ops.tile(best[:, :1], (1, 2)))
        drafted = self.argmax(self.draft(h, follow, positions))  # [1, 2]
        guess = ops.select(accepted, drafted[:, 1:], drafted[:, :1])
        return ops.concat((best, guess), 1).reshape(3)


def load_caches(params: Sequence[Parameter], caches: np.ndarray, batch: int) -> None:
    """Fill cache Parameters ([batch * M, D] each) from caches ``[len(params), n, S, D]`` (a prefill's, S <= M,
    or rows read from another decode graph; ``[n, S, D]`` for a single Parameter): sequence j goes to row j,
    every other row and position is zeroed. Raises ValueError for more tokens than M or more sequences than
    ``batch``."""
    caches = np.asarray(caches, np.float32)
    if caches.ndim == 3:  # a single cache (the MTP layer's)
        caches = caches[None]
    rows, width = params[0].shape
    max_len = rows // batch
    n, s = caches.shape[1], caches.shape[2]
    if s > max_len:
        raise ValueError(f"the prompt batch has {s} tokens; the cache holds at most {max_len}")
    if n > batch:
        raise ValueError(f"{n} sequences do not fit a decode batch of {batch}")
    for param, cache in zip(params, caches):
        full = np.zeros((batch, max_len, width), np.float32)
        full[:n, :s] = cache
        param.set_data(Tensor(full.reshape(rows, width)))


def read_caches(params: Sequence[Parameter], batch: int, rows: Sequence[int]) -> List[np.ndarray]:
    """The cache rows (sequences) ``rows`` of each Parameter [batch * M, D] -> [len(rows), M, D] per Parameter
    (for moving sequences to another batch size)."""
    out = []
    for param in params:
        full = param.asnumpy()
        out.append(full.reshape(batch, full.shape[0] // batch, full.shape[1])[list(rows)])
    return out
