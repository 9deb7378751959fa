"""Packed, tokenised MindRecord datasets: preprocessing, held-out split, and a resumable batch stream.

A dataset directory holds MindRecord shards (``data.mindrecordN`` + index files) of fixed-length samples of
``seq_length + 1`` token ids (inputs are ``[:-1]``, labels ``[1:]``), and ``metadata.json``. Documents are joined
with the tokenizer's end-of-document id and cut into consecutive samples; the tail that does not fill a sample
is dropped. Batches are read through ``mindspore.dataset.MindDataset`` with an explicit ``SubsetSampler`` order:
a seeded permutation per epoch, a contiguous slice per data-parallel rank, and an (epoch, offset) position that
resumes exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from ..fsutil import replace_dir, staging_dir

METADATA = "metadata.json"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


def read_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """Documents from a text file (the whole file is one document) or JSONL (one per line, field ``text_key``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file '{path}' does not exist")
    if path.endswith(JSONL_SUFFIXES):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[text_key]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a '{text_key}' string") from None
    else:
        with open(path, encoding="utf-8") as fh:
            yield fh.read()


def _fingerprint(paths: Sequence[str], tokenizer_name: str, seq_length: int) -> str:
    h = hashlib.sha256(f"{tokenizer_name}|{seq_length}".encode())
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def preprocess(inputs: Sequence[str], tokenizer, seq_length: int, out_dir: str, shards: int = 1,
               text_key: str = "text", progress: bool = True) -> dict:
    """Tokenise, pack and write a MindRecord dataset directory (atomically: built aside, then renamed)."""
    from mindspore.mindrecord import FileWriter
    from tqdm import tqdm

    ids: List[int] = []
    docs = 0
    for path in tqdm(list(inputs), desc="tokenising", unit="file", disable=not progress):
        for doc in read_documents(path, text_key):
            ids.extend(tokenizer.encode(doc))
            ids.append(tokenizer.eos_id)
            docs += 1
    width = seq_length + 1
    n = len(ids) // width
    if n < 2:
        raise ValueError(f"{len(ids)} tokens make fewer than 2 samples of {width} tokens; add text or lower "
                         "train_dataset.seq_length")
    samples = np.asarray(ids[: n * width], np.int32).reshape(n, width)
    tmp = staging_dir(out_dir)
    writer = FileWriter(os.path.join(tmp, "data.mindrecord"), shard_num=shards, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]}}, "packed token ids")
    for start in range(0, n, 4096):
        writer.write_raw_data([{"input_ids": row} for row in samples[start:start + 4096]])
    writer.commit()
    meta = {"num_samples": n, "seq_length": seq_length, "tokens": int(n * width), "documents": docs,
            "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "fingerprint": _fingerprint(inputs, tokenizer.name, seq_length), "sources": [os.path.abspath(p) for p in inputs]}
    with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
    replace_dir(tmp, out_dir)
    return meta


def cached_dataset(source: str, tokenizer, seq_length: int, cache_root: str) -> str:
    """A MindRecord directory for a raw text/JSONL file, built once into ``cache_root`` (keyed by content)."""
    key = _fingerprint([source], tokenizer.name, seq_length)
    out = os.path.join(cache_root, f"{os.path.splitext(os.path.basename(source))[0]}-{key}")
    if not os.path.isfile(os.path.join(out, METADATA)):
        os.makedirs(cache_root, exist_ok=True)
        preprocess([source], tokenizer, seq_length, out)
    return out


@dataclass
class Position:
    """Where the stream is: epoch number and the number of samples of that epoch already consumed (per rank)."""
    epoch: int = 0
    offset: int = 0


class PackedDataset:
    """A preprocessed dataset directory: train / held-out split and batch streams."""

    def __init__(self, path: str, eval_fraction: float = 0.0):
        meta_path = os.path.join(path, METADATA)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"'{path}' is not a preprocessed dataset (no {METADATA}); run "
                                    "tools/preprocess_data.py or point train_dataset.data_path at a .txt/.jsonl file")
        try:
            with open(meta_path, encoding="utf-8") as fh:
                self.meta = json.load(fh)
            self.num_samples = int(self.meta["num_samples"])
            self.seq_length = int(self.meta["seq_length"])
        except (json.JSONDecodeError, KeyError, ValueError):
            raise ValueError(f"'{meta_path}' is corrupt") from None
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path)
                            if f.startswith("data.mindrecord") and not f.endswith(".db"))
        if not self.files:
            raise FileNotFoundError(f"'{path}' holds no MindRecord shards")
        self.path = path
        n_eval = int(np.ceil(self.num_samples * eval_fraction)) if eval_fraction > 0 else 0
        self.train_indices = np.arange(self.num_samples - n_eval)
        self.eval_indices = np.arange(self.num_samples - n_eval, self.num_samples)

    def read(self, indices: Sequence[int]) -> np.ndarray:
        """Samples in the given order, [len(indices), seq_length + 1] int32, through mindspore.dataset."""
        import mindspore.dataset as ds

        data = ds.MindDataset(self.files, columns_list=["input_ids"], sampler=ds.SubsetSampler(list(map(int, indices))))
        try:
            rows = [r[0] for r in data.create_tuple_iterator(output_numpy=True, num_epochs=1)]
        except RuntimeError as e:
            raise ValueError(f"cannot read dataset '{self.path}': {str(e).splitlines()[0]}") from None
        return np.stack(rows).astype(np.int32)

    def epoch_order(self, epoch: int, seed: int, shuffle: bool, batch_size: int = 1, rank: int = 0,
                    world: int = 1) -> np.ndarray:
        """This rank's sample order for ``epoch``: a seeded permutation of the train split, cut into global
        batches of batch_size x world samples, of which rank r takes the r-th slice (so the ranks' batches
        together are the single-process batch of batch_size x world)."""
        order = self.train_indices
        if shuffle:
            order = order[np.random.default_rng([seed, epoch]).permutation(len(order))]
        usable = len(order) // (batch_size * world) * batch_size * world
        return order[:usable].reshape(-1, world, batch_size)[:, rank].reshape(-1)

    def batches(self, batch_size: int, position: Position, seed: int, shuffle: bool = True, rank: int = 0,
                world: int = 1, prefetch: int = 64) -> Iterator[Tuple[np.ndarray, Position]]:
        """Endless (batch [B, S+1], position after it), starting at ``position``."""
        epoch, offset = position.epoch, position.offset
        while True:
            order = self.epoch_order(epoch, seed, shuffle, batch_size, rank, world)
            usable = len(order)
            if usable == 0:
                raise ValueError(f"batch size {batch_size} x {world} data-parallel ranks exceeds the "
                                 f"{len(self.train_indices)} training samples")
            while offset < usable:
                chunk = order[offset: min(usable, offset + prefetch * batch_size)]
                rows = self.read(chunk)
                for i in range(0, len(rows), batch_size):
                    offset += batch_size
                    yield rows[i:i + batch_size], Position(epoch, offset)
            epoch, offset = epoch + 1, 0

    def eval_batches(self, batch_size: int, count: int) -> List[np.ndarray]:
        """The first ``count`` batches of the held-out split (the same every time)."""
        n = min(len(self.eval_indices), batch_size * count) // batch_size * batch_size
        if n == 0:
            return []
        rows = self.read(self.eval_indices[:n])
        return [rows[i:i + batch_size] for i in range(0, n, batch_size)]
