"""Token generation from the Python model or exported MindIR files, batched over prompts of different lengths,
and MTP speculative decoding.

A runner (:class:`ModelRunner`, :class:`MindIRRunner`) holds a prefill graph and decode graphs of static batch
sizes whose attention caches live inside them (``inference/steps.py``); :func:`generate` drives either kind the
same way, so the two paths are compared token for token.
"""
from __future__ import annotations

import abc
import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import mindspore as ms

FORMAT = "mindpangu-mindir/2"  # the export directory layout this version reads (manifest "format")


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


class Runner(abc.ABC):
    """What :func:`generate` and :class:`SpeculativeDecoder` drive: a prefill graph (``prefill_cell``) and decode
    graphs of static batch sizes, each holding its caches as Parameters (:meth:`cache_params`). Subclasses set
    ``max_len`` and ``prefill_cell``."""

    max_len: int

    def __init__(self):
        self._cells: Dict = {}

    def prefill(self, ids: np.ndarray, lengths: np.ndarray):
        """Right-padded prompts [B, S] int32 and their lengths [B] -> (last-token logits [B, V] np.float32,
        residual stream [B, S, H] (Tensor), caches [L, B, S, D] np.float32)."""
        logits, h, caches = self.prefill_cell(ms.Tensor(ids, ms.int32), ms.Tensor(lengths, ms.int32))
        return logits.asnumpy(), h, caches.asnumpy()

    def bucket(self, n: int) -> int:
        """The smallest decode batch size that holds n sequences; ValueError if none does."""
        sizes = [b for b in self.batch_sizes(n) if b >= n]
        if not sizes:
            raise ValueError(f"{n} sequences exceed the largest decode batch size {max(self.batch_sizes(n))}; "
                             "generate them in smaller groups, or export larger ones "
                             "(mindpangu-export --batch-sizes ...)")
        return min(sizes)

    def decode_cell(self, batch: int):
        if batch not in self._cells:
            self._cells[batch] = self._decode_cell(batch)
        return self._cells[batch]

    def decode(self, batch: int, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids / positions [batch, 1] int32 -> logits [batch, 1, V] np.float32 from the batch-``batch`` graph.
        Raises ValueError for a position outside [0, max_len)."""
        if positions.min() < 0 or positions.max() >= self.max_len:
            raise ValueError(f"decode positions must be in [0, {self.max_len}) (the cache length), got "
                             f"{positions.min()}..{positions.max()}")
        return self.decode_cell(batch)(ms.Tensor(ids, ms.int32), ms.Tensor(positions, ms.int32)).asnumpy()

    def warmup(self, n: int) -> None:
        """Compile (or load) every graph that generating for up to n sequences can use, so that timings after it
        exclude compiles: prefill, and each decode batch size up to the one that holds n (one step at position
        0; :func:`generate` refills the caches before it decodes)."""
        self.prefill(np.zeros((1, 1), np.int32), np.ones(1, np.int32))
        for b in self.batch_sizes(n):
            if b <= self.bucket(n):
                self.decode(b, np.zeros((b, 1), np.int32), np.zeros((b, 1), np.int32))

    @abc.abstractmethod
    def cache_params(self, batch: int) -> List:
        """The batch-``batch`` decode graph's cache Parameters, one per layer."""

    @abc.abstractmethod
    def batch_sizes(self, n: int) -> List[int]:
        """Decode batch sizes available for n sequences."""

    @abc.abstractmethod
    def _decode_cell(self, batch: int):
        """Build or load the batch-``batch`` decode graph."""

    @abc.abstractmethod
    def speculative_cells(self):
        """(``SpeculativeStep`` graph, its main-model cache Parameters, the draft prefill graph, its MTP cache
        Parameter in a list)."""


class ModelRunner(Runner):
    """The Python model through the same cells that are exported (``export_for_serving``): prefill with dynamic
    batch and prompt length (the reference MoE path, compiled once in GRAPH mode), decode with the model's own
    backends (C++ kernels on CPU) at static batch sizes: powers of two, each compiled on first use."""

    def __init__(self, model, max_len: int):
        from ..export.mindir import serving_cells

        super().__init__()
        limit = model.config.max_position_embeddings
        if not 1 <= max_len <= limit:
            raise ValueError(f"max_len must be in [1, max_position_embeddings = {limit}], got {max_len}")
        self.model, self.max_len = model, max_len
        self.prefill_cell = serving_cells(model, max_len, batch_sizes=())[0]

    def batch_sizes(self, n: int) -> List[int]:
        return [1 << i for i in range(int(np.ceil(np.log2(max(1, n)))) + 1)]

    def _decode_cell(self, batch: int):
        from .steps import DecodeStep

        return DecodeStep(self.model, batch, self.max_len)

    def cache_params(self, batch: int) -> List:
        return list(self.decode_cell(batch).caches)

    def speculative_cells(self):
        """(the speculative step, its main-model cache Parameters, draft prefill, the MTP cache Parameter).
        Raises ValueError for a model without MTP layers."""
        from ..export.mindir import draft_prefill_cell
        from . import steps

        if not self.model.config.num_mtp_layers:
            raise ValueError("speculative decoding drafts with the MTP module: the model has num_mtp_layers = 0")
        step = steps.SpeculativeStep(self.model, self.max_len)
        return step, list(step.verify.caches), draft_prefill_cell(self.prefill_cell), [step.draft.cache]


class MindIRRunner(Runner):
    """Exported graphs (see ``mindpangu.export.export_for_serving``): ``prefill.mindir``, one
    ``decode_b<batch>.mindir`` per exported batch size, and the speculative graphs when the model has MTP."""

    def __init__(self, directory: str):
        from ..export.mindir import load_mindir

        super().__init__()
        path = os.path.join(directory, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"'{directory}' is not an export directory (no manifest.json); "
                                    "write one with tools/export_mindir.py")
        with open(path, encoding="utf-8") as fh:
            self.manifest = json.load(fh)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"'{directory}' was exported as {self.manifest.get('format')!r}; this version reads "
                             f"{FORMAT!r}: export it again with tools/export_mindir.py")
        self.directory, self._load = directory, load_mindir
        self.max_len = self.manifest["cache"]["max_len"]
        self.graphs = self.manifest["graphs"]
        self.prefill_cell = self._graph("prefill")

    def _graph(self, name: str):
        return self._load(os.path.join(self.directory, self.graphs[name]["file"]))

    def batch_sizes(self, n: int) -> List[int]:
        return sorted(self.manifest["decode_batch_sizes"])

    def _decode_cell(self, batch: int):
        return self._graph(f"decode_b{batch}")

    def cache_params(self, batch: int) -> List:
        return _named_caches(self.decode_cell(batch), self.manifest["cache"]["layers"])

    def speculative_cells(self):
        if "speculative" not in self.graphs:
            raise ValueError(f"'{self.directory}' has no speculative graphs: the model has no MTP layer")
        from .steps import MTP_CACHE

        step = self._graph("speculative")
        return (step, _named_caches(step, self.manifest["cache"]["layers"]), self._graph("draft_prefill"),
                [_param(step, MTP_CACHE)])



def _param(graph, name: str):
    for p in graph.get_parameters():
        if p.name == name:
            return p
    raise KeyError(f"the exported graph has no parameter {name!r}")


def _named_caches(graph, layers: int) -> List:
    from .steps import CACHE_PREFIX

    return [_param(graph, f"{CACHE_PREFIX}{i}") for i in range(layers)]


def _prompts(prompts, max_len: int) -> List[np.ndarray]:
    """A [B, S] array or a list of 1-D token sequences -> list of int32 arrays, checked against the cache."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompt must be [batch, seq] with seq >= 1, got shape {prompts.shape}")
        seqs = list(prompts.astype(np.int32))
    else:
        seqs = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not seqs:
        raise ValueError("no prompts given")
    for i, p in enumerate(seqs):
        if not 1 <= len(p) <= max_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens; it needs 1 to {max_len} (the cache length)")
    return seqs


def right_pad(seqs: Sequence[np.ndarray]):
    """Sequences -> (ids [B, max length] int32, zero-padded on the right, lengths [B] int32)."""
    lengths = np.array([len(p) for p in seqs], np.int32)
    ids = np.zeros((len(seqs), int(lengths.max())), np.int32)
    for i, p in enumerate(seqs):
        ids[i, : len(p)] = p
    return ids, lengths


def _move(runner: Runner, src: int, dst: int, rows: Sequence[int]) -> None:
    """Copy the cache rows ``rows`` of the batch-``src`` graph into rows 0.. of the batch-``dst`` graph."""
    from .steps import load_caches, read_caches

    load_caches(runner.cache_params(dst), np.stack(read_caches(runner.cache_params(src), src, rows)), dst)


def generate(runner: Runner, prompts: Union[np.ndarray, Sequence], max_new_tokens: int, sampler: Sampler,
             eos_id: Optional[int] = None) -> Dict:
    """Prompts ([B, S] array, or a list of token sequences of any lengths) -> {tokens [B, N] int32, lengths [B],
    ttft_s, decode_s, decode_tokens_per_s}.

    All prompts are prefilled in one right-padded batch and decoded together, each at its own positions. A
    sequence stops after ``max_new_tokens``, at the cache length, or after producing ``eos_id``; then it leaves
    the batch, and when the live sequences fit a smaller decode batch size their caches move there, so finished
    sequences stop costing compute. ``tokens`` rows shorter than N are padded with -1 (``lengths`` gives each
    row's count). Greedy tokens equal running each prompt alone (tested).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    seqs = _prompts(prompts, runner.max_len)
    n = len(seqs)
    budget = [min(max_new_tokens, runner.max_len - len(p) + 1) for p in seqs]
    runner.bucket(n)  # too many sequences for the decode graphs: say so before any work
    ids, lengths = right_pad(seqs)
    start = time.perf_counter()
    logits, _, caches = runner.prefill(ids, lengths)
    out = [[int(t)] for t in sampler(logits)]
    ttft = time.perf_counter() - start

    def finished(b):
        return len(out[b]) >= budget[b] or (eos_id is not None and out[b][-1] == eos_id)

    live = [b for b in range(n) if not finished(b)]
    t0 = time.perf_counter()
    decoded = 0
    batch = 0
    if live:
        from .steps import load_caches

        batch = runner.bucket(len(live))
        load_caches(runner.cache_params(batch), caches[:, live], batch)
    row = {b: j for j, b in enumerate(live)}
    while live:
        smaller = runner.bucket(len(live))
        if smaller < batch:
            _move(runner, batch, smaller, [row[b] for b in live])
            batch, row = smaller, {b: j for j, b in enumerate(live)}
        step_ids = np.zeros((batch, 1), np.int32)
        positions = np.zeros((batch, 1), np.int32)
        for b in live:
            step_ids[row[b], 0] = out[b][-1]
            positions[row[b], 0] = lengths[b] + len(out[b]) - 1
        logits = runner.decode(batch, step_ids, positions)[:, 0]
        picked = sampler(logits[[row[b] for b in live]])
        for b, token in zip(live, picked):
            out[b].append(int(token))
        decoded += len(live)
        live = [b for b in live if not finished(b)]
    decode_s = time.perf_counter() - t0
    counts = np.array([len(o) for o in out], np.int32)
    tokens = np.full((n, int(counts.max())), -1, np.int32)
    for b, o in enumerate(out):
        tokens[b, : len(o)] = o
    return {"tokens": tokens, "lengths": counts, "ttft_s": ttft, "decode_s": decode_s,
            "decode_tokens_per_s": decoded / decode_s if decoded else float("nan")}


class SpeculativeDecoder:
    """Greedy decoding where the first MTP layer drafts one token and the main model verifies it, from a
    :class:`ModelRunner` or a :class:`MindIRRunner` (whose export holds the speculative and draft_prefill graphs).

    Each step (one ``SpeculativeStep`` graph call) feeds the main model [last token, draft] at once: the draft is
    accepted when it equals the main model's greedy choice, and then the main model's prediction after it comes
    for free (2 tokens per step), otherwise the main model's own token is kept (1 token); the same graph drafts
    the next token. The output is plain greedy's, token for token. The draft for position p uses the main
    residual at p and the token at p + 1, as in MTP training. The graphs are built once, so in GRAPH mode they
    compile on the first call only.
    """

    def __init__(self, runner: Runner):
        self.runner, self.max_len = runner, runner.max_len
        self.step, self.main_caches, self.draft_prefill, self.draft_cache = runner.speculative_cells()

    def against_greedy(self, prompt: np.ndarray, max_new_tokens: int) -> Dict:
        """One prompt [S] decoded greedily with and without the drafts, as many tokens as both fit in the cache
        -> {"speculative": this decoder's result, "greedy": :func:`generate`'s, "identical": bool}."""
        prompt = np.asarray(prompt, np.int32).reshape(1, -1)
        n = min(max_new_tokens, self.max_len - prompt.shape[1])
        spec, plain = self(prompt, n), generate(self.runner, prompt, n, Sampler())
        return {"speculative": spec, "greedy": plain, "identical": bool(np.array_equal(spec["tokens"], plain["tokens"]))}

    def __call__(self, prompt: np.ndarray, max_new_tokens: int) -> Dict:
        """prompt [1, S] -> {tokens [1, N], drafts, accepted, acceptance_rate, mean_accepted_length, steps, ...}."""
        from .steps import load_caches

        prompt = np.asarray(prompt, np.int32)
        if prompt.ndim != 2 or prompt.shape[0] != 1:
            raise ValueError(f"speculative decoding takes one prompt [1, seq], got shape {prompt.shape}")
        s, max_len = prompt.shape[1], self.max_len
        if s + max_new_tokens > max_len:  # the last verify step writes position s + max_new_tokens - 1
            raise ValueError(f"prompt ({s}) + new tokens ({max_new_tokens}) exceed the cache length {max_len}")
        start = time.perf_counter()
        logits, h, caches = self.runner.prefill(prompt, np.array([s], np.int32))
        load_caches(self.main_caches, caches, 1)
        out: List[int] = [int(logits.argmax(-1)[0])]
        ttft = time.perf_counter() - start
        # MTP cache over positions 0..s-1: (main residual at p, token at p + 1)
        next_ids = np.concatenate([prompt[:, 1:], [[out[0]]]], 1).astype(np.int32)
        d_logits, d_cache = self.draft_prefill(h, ms.Tensor(next_ids))
        load_caches(self.draft_cache, d_cache.asnumpy(), 1)
        guess = int(d_logits.asnumpy()[0, -1].argmax())
        p = s  # position of out[-1], the newest token, not yet in the main cache
        accepted = steps = 0
        t0 = time.perf_counter()
        while len(out) < max_new_tokens:
            steps += 1
            after_t, after_d, next_guess = (int(v) for v in self.step(
                ms.Tensor([[out[-1], guess]], ms.int32), ms.Tensor([[p, p + 1]], ms.int32)).asnumpy())
            if after_t == guess:  # the draft was right: the token after it comes for free
                accepted += 1
                out += [guess, after_d]
                p += 2
            else:
                out.append(after_t)
                p += 1
            guess = next_guess
        decode_s = time.perf_counter() - t0
        tokens = np.array([out[:max_new_tokens]], np.int32)
        return {"tokens": tokens, "ttft_s": ttft, "decode_s": decode_s, "steps": steps, "drafts": steps,
                "accepted": accepted, "acceptance_rate": accepted / steps if steps else float("nan"),
                "mean_accepted_length": (len(out) - 1) / steps if steps else float("nan"),
                "decode_tokens_per_s": (tokens.shape[1] - 1) / decode_s if decode_s else float("nan")}
