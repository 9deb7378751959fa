"""Token generation from the Python model or exported MindIR files, and MTP speculative decoding.

A runner has ``prefill(ids [B, S]) -> (logits [B, V], caches [L, B, S, D])`` and
``decode(ids [B, 1], positions [B, 1], caches [L, B, M, D]) -> (logits [B, 1, V], caches)``; ``generate`` drives
either kind the same way, so the two paths are compared token for token.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms


@dataclass
class Sampler:
    """Greedy when ``temperature`` is 0, else softmax(logits / temperature) restricted to the smallest set of
    tokens whose probability reaches ``top_p`` (nucleus sampling), drawn from a seeded generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self.rng = np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B] (int32)."""
        if self.temperature == 0:
            return logits.argmax(-1).astype(np.int32)
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out = np.empty(len(p), np.int32)
        for b, row in enumerate(p):
            order = np.argsort(-row, kind="stable")
            keep = order[: int(np.searchsorted(np.cumsum(row[order]), self.top_p) + 1)]
            out[b] = self.rng.choice(keep, p=row[keep] / row[keep].sum())
        return out


class ModelRunner:
    """The Python model through the same prefill / decode cells that are exported (``export_for_serving``): prefill
    with a dynamic batch and prompt length, so it compiles once in GRAPH mode; decode with a static batch."""

    def __init__(self, model, max_len: int):
        from ..export.mindir import serving_cells

        self.max_len = max_len
        self.prefill_cell, self.decode_cell = serving_cells(model, max_len, dynamic_decode=False)

    def prefill(self, ids):
        return self.prefill_cell(ms.Tensor(ids, ms.int32))

    def decode(self, ids, positions, caches):
        return self.decode_cell(ms.Tensor(ids, ms.int32), ms.Tensor(positions, ms.int32), caches)


class MindIRRunner:
    """Exported ``prefill.mindir`` and ``decode.mindir`` (see ``mindpangu.export.export_for_serving``)."""

    def __init__(self, directory: str):
        from ..export.mindir import load_mindir

        path = os.path.join(directory, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"'{directory}' is not an export directory (no manifest.json); "
                                    "write one with tools/export_mindir.py")
        with open(path, encoding="utf-8") as fh:
            self.manifest = json.load(fh)
        self.max_len = self.manifest["cache"]["max_len"]
        graphs = self.manifest["graphs"]
        self.prefill_cell = load_mindir(os.path.join(directory, graphs["prefill"]["file"]))
        self.decode_cell = load_mindir(os.path.join(directory, graphs["decode"]["file"]))

    def prefill(self, ids):
        return self.prefill_cell(ms.Tensor(ids, ms.int32))

    def decode(self, ids, positions, caches):
        return self.decode_cell(ms.Tensor(ids, ms.int32), ms.Tensor(positions, ms.int32), caches)


def pad_caches(caches, max_len: int) -> ms.Tensor:
    """Prefill caches [L, B, S, D] -> the decode layout [L, B, max_len, D] (zeros after S)."""
    c = caches.asnumpy()
    if c.shape[2] > max_len:
        raise ValueError(f"the prompt has {c.shape[2]} tokens; the cache holds at most {max_len}")
    return ms.Tensor(np.pad(c, ((0, 0), (0, 0), (0, max_len - c.shape[2]), (0, 0))))


def generate(runner, prompt: np.ndarray, max_new_tokens: int, sampler: Sampler,
             eos_id: Optional[int] = None) -> Dict:
    """Prompts [B, S] (equal lengths) -> {tokens [B, N], ttft_s, decode_tokens_per_s, ...}.

    Stops after ``max_new_tokens``, at the cache length, or when every sequence has produced ``eos_id``.
    """
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, seq] with seq >= 1, got shape {prompt.shape}")
    b, s = prompt.shape
    steps = min(max_new_tokens, runner.max_len - s + 1)
    if steps < 1:
        raise ValueError(f"the prompt has {s} tokens; the cache holds at most {runner.max_len}")
    start = time.perf_counter()
    logits, caches = runner.prefill(prompt)
    caches = pad_caches(caches, runner.max_len)
    tokens = [sampler(logits.asnumpy())]
    ttft = time.perf_counter() - start
    done = tokens[-1] == eos_id if eos_id is not None else np.zeros(b, bool)
    t0 = time.perf_counter()
    for i in range(1, steps):
        if done.all():
            break
        positions = np.full((b, 1), s + i - 1, np.int32)
        logits, caches = runner.decode(tokens[-1].reshape(b, 1), positions, caches)
        tokens.append(sampler(logits.asnumpy()[:, 0]))
        if eos_id is not None:
            done |= tokens[-1] == eos_id
    decode_s = time.perf_counter() - t0
    out = np.stack(tokens, 1)
    n_decoded = (out.shape[1] - 1) * b
    return {"tokens": out, "ttft_s": ttft, "decode_s": decode_s,
            "decode_tokens_per_s": n_decoded / decode_s if n_decoded else float("nan")}


class SpeculativeDecoder:
    """Greedy decoding where the first MTP layer drafts one token and the main model verifies it.

    Each step feeds the main model [last token, draft] at once: the draft is accepted when it equals the main
    model's greedy choice, and then the main model's prediction after it comes for free (2 tokens per step),
    otherwise the main model's own token is kept (1 token). The output is plain greedy's, token for token. The
    draft for position p uses the main residual at p and the token at p + 1, as in MTP training. The cells are
    built once, so in GRAPH mode they compile on the first call only.
    """

    def __init__(self, model, max_len: int):
        from .steps import DecodeStep, DraftStep, PrefillStep

        if not model.config.num_mtp_layers:
            raise ValueError("speculative decoding drafts with the MTP module: the model has num_mtp_layers = 0")
        self.max_len = max_len
        self.prefill, self.verify = PrefillStep(model, hidden=True), DecodeStep(model, hidden=True)
        self.draft = DraftStep(model)

    def __call__(self, prompt: np.ndarray, max_new_tokens: int) -> Dict:
        """prompt [1, S] -> {tokens [1, N], drafts, accepted, acceptance_rate, mean_accepted_length, steps, ...}."""
        prompt = np.asarray(prompt, np.int32)
        if prompt.ndim != 2 or prompt.shape[0] != 1:
            raise ValueError(f"speculative decoding takes one prompt [1, seq], got shape {prompt.shape}")
        s, max_len = prompt.shape[1], self.max_len
        if s + max_new_tokens + 1 > max_len:
            raise ValueError(f"prompt ({s}) + new tokens ({max_new_tokens}) + 1 exceed the cache length {max_len}")

        def pos(*p):
            return ms.Tensor(np.array([p], np.int32))

        start = time.perf_counter()
        logits, h, caches = self.prefill(ms.Tensor(prompt))
        caches = pad_caches(caches, max_len)
        out: List[int] = [int(logits.asnumpy().argmax(-1)[0])]
        ttft = time.perf_counter() - start
        # MTP cache over positions 0..s-1: (main residual at p, token at p + 1)
        next_ids = np.concatenate([prompt[:, 1:], [[out[0]]]], 1)
        mtp_cache = ms.Tensor(np.zeros((1, max_len, caches.shape[-1]), np.float32))
        d_logits, mtp_cache = self.draft(h, ms.Tensor(next_ids), ms.Tensor(np.arange(s, dtype=np.int32)[None]),
                                         mtp_cache)
        guess = int(d_logits.asnumpy()[0, -1].argmax())
        p = s  # position of out[-1], the newest token, not yet in the main cache
        accepted = steps = 0
        t0 = time.perf_counter()
        while len(out) < max_new_tokens:
            steps += 1
            logits, h, caches = self.verify(ms.Tensor([[out[-1], guess]], ms.int32), pos(p, p + 1), caches)
            best = logits.asnumpy()[0].argmax(-1)
            # the MTP layer always runs on both positions (one compiled shape): after a rejection its entry at
            # p + 1 is a placeholder that no query sees (positions mask it) and the next step overwrites
            if int(best[0]) == guess:
                accepted += 1
                out += [guess, int(best[1])]
                d_logits, mtp_cache = self.draft(h, ms.Tensor([[guess, out[-1]]], ms.int32), pos(p, p + 1),
                                                 mtp_cache)
                guess, p = int(d_logits.asnumpy()[0, 1].argmax()), p + 2
            else:
                out.append(int(best[0]))
                d_logits, mtp_cache = self.draft(h, ms.Tensor([[out[-1], out[-1]]], ms.int32), pos(p, p + 1),
                                                 mtp_cache)
                guess, p = int(d_logits.asnumpy()[0, 0].argmax()), p + 1
        decode_s = time.perf_counter() - t0
        tokens = np.array([out[:max_new_tokens]], np.int32)
        return {"tokens": tokens, "ttft_s": ttft, "decode_s": decode_s, "steps": steps, "drafts": steps,
                "accepted": accepted, "acceptance_rate": accepted / steps if steps else float("nan"),
                "mean_accepted_length": (len(out) - 1) / steps if steps else float("nan"),
                "decode_tokens_per_s": (tokens.shape[1] - 1) / decode_s if decode_s else float("nan")}
