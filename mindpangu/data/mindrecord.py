"""Packed, tokenised MindRecord datasets: streaming preprocessing, held-out split, and a resumable batch stream.

A dataset directory holds MindRecord files (``data-00000.mindrecord`` ... + index files) of fixed-length samples
of ``seq_length + 1`` token ids (inputs are ``[:-1]``, labels ``[1:]``), and ``metadata.json``, written last:
a directory without it is not a dataset. Documents are joined with the tokenizer's end-of-document id and cut
into consecutive samples; the tail that does not fill a sample is dropped. With domain labels each sample also
has a ``domain_ids`` column: the index (into ``metadata.json: domains``) of the document each token came from.

Preprocessing streams (``mindpangu.data.corpus`` reads the documents): documents are tokenised in batches, packed
and written as each shard fills, so memory does not grow with the corpus. Batches are read through
``mindspore.dataset.MindDataset`` with an explicit ``SubsetSampler`` order: a seeded permutation per epoch, a
contiguous slice per data-parallel rank, and an (epoch, offset) position that resumes exactly.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..fsutil import replace_dir, staging_dir, write_text_atomic
from ..progress import progress_bar
from .corpus import CorpusReader, Document, batched, expand_inputs

METADATA = "metadata.json"
SHARD_MB = 256  # MiB of samples per MindRecord file: several files per GB, so data-parallel readers spread out


def _fingerprint(paths: Sequence[str], tokenizer_name: str, seq_length: int, text_key: str = "text",
                 domain_key: Optional[str] = None) -> str:
    h = hashlib.sha256(f"{tokenizer_name}|{seq_length}".encode())
    if text_key != "text" or domain_key:
        h.update(f"|{text_key}|{domain_key}".encode())
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class _ShardWriter:
    """MindRecord files of ``rows_per_file`` samples each, every file committed as soon as it is full."""

    def __init__(self, directory: str, width: int, shard_bytes: int, with_domains: bool):
        self.directory, self.with_domains = directory, with_domains
        self.rows_per_file = max(1, shard_bytes // (width * 4 * (2 if with_domains else 1)))
        self.files: List[str] = []
        self.rows = 0
        self._writer, self._in_file = None, 0

    def _open(self) -> None:
        from mindspore.mindrecord import FileWriter

        name = f"data-{len(self.files):05d}.mindrecord"
        self._writer = FileWriter(os.path.join(self.directory, name), shard_num=1, overwrite=True)
        schema = {"input_ids": {"type": "int32", "shape": [-1]}}
        if self.with_domains:
            schema["domain_ids"] = {"type": "int32", "shape": [-1]}
        self._writer.add_schema(schema, "packed token ids")
        self.files.append(name)
        self._in_file = 0

    def write(self, ids: np.ndarray, domains: Optional[np.ndarray]) -> None:
        """Append samples ``ids`` [n, width] int32 (and their ``domains``, same shape)."""
        i = 0
        while i < len(ids):
            if self._writer is None:
                self._open()
            n = min(len(ids) - i, self.rows_per_file - self._in_file)
            if self.with_domains:
                records = [{"input_ids": a, "domain_ids": b} for a, b in zip(ids[i:i + n], domains[i:i + n])]
            else:
                records = [{"input_ids": a} for a in ids[i:i + n]]
            self._writer.write_raw_data(records)
            i, self._in_file, self.rows = i + n, self._in_file + n, self.rows + n
            if self._in_file == self.rows_per_file:
                self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.commit()
            self._writer = None


class _Packer:
    """Joins tokenised documents with the end-of-document id and cuts the stream into samples of ``width`` ids,
    carrying the unfilled tail to the next call; with domain labels, a parallel stream of domain indices."""

    def __init__(self, width: int, eos_id: int, with_domains: bool):
        self.width, self.with_domains = width, with_domains
        self.eos = np.asarray([eos_id], np.int32)
        self.carry, self.carry_domains = np.empty(0, np.int32), np.empty(0, np.int32)
        self.domains: Dict[str, int] = {}
        self.documents = 0

    def add(self, docs: Sequence[Document], ids: Sequence[np.ndarray]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The full samples [n, width] int32 (and their domain indices) that these documents complete."""
        parts, domain_parts = [self.carry], [self.carry_domains]
        for doc, x in zip(docs, ids):
            parts.append(x)
            if doc.end_of_document:
                parts.append(self.eos)
                self.documents += 1
            if self.with_domains:
                index = self.domains.setdefault(doc.domain, len(self.domains))
                domain_parts.append(np.full(len(x) + doc.end_of_document, index, np.int32))
        stream = np.concatenate(parts)
        n = len(stream) // self.width * self.width
        self.carry = stream[n:].copy()
        if not self.with_domains:
            return stream[:n].reshape(-1, self.width), None
        domains = np.concatenate(domain_parts)
        self.carry_domains = domains[n:].copy()
        return stream[:n].reshape(-1, self.width), domains[:n].reshape(-1, self.width)


def preprocess(inputs: Sequence[str], tokenizer, seq_length: int, out_dir: str, shard_mb: float = SHARD_MB,
               text_key: str = "text", domain_key: Optional[str] = None, progress: bool = True,
               reap: bool = True) -> dict:
    """Tokenise, pack and write a MindRecord dataset directory, streaming: memory stays bounded by one batch of
    documents (about 1 MiB of text) and one MindRecord write, whatever the corpus size.

    ``inputs``: files or glob patterns (``mindpangu.data.corpus``: plain text, JSONL, ``.gz``), read in order.
    ``shard_mb``: MiB of samples per MindRecord file. ``domain_key``: JSONL field with each document's domain label
    (a plain-text file's label is its name); adds the ``domain_ids`` column. Returns the metadata.

    The directory is built beside ``out_dir`` and renamed into place when complete; an interrupted run removes it
    (a killed one leaves a ``.tmp<pid>`` directory without ``metadata.json``, which does not load and which the next
    run with the same ``out_dir`` removes, unless ``reap`` is False: the trainer's cache, which every rank may
    build at once). Raises FileNotFoundError / ValueError (naming file and line) for bad
    input, and ValueError when the corpus makes fewer than 2 samples.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if not shard_mb > 0:
        raise ValueError(f"shard_mb must be > 0, got {shard_mb}")
    paths = expand_inputs(inputs)
    reader = CorpusReader(paths, text_key, domain_key)
    width = seq_length + 1
    with_domains = domain_key is not None
    packer = _Packer(width, tokenizer.eos_id, with_domains)
    tmp = staging_dir(out_dir, reap)
    bar = progress_bar(total=reader.total_bytes, desc="preprocessing", unit="B", unit_scale=True,
                       unit_divisor=1024, disable=not progress)
    try:
        writer = _ShardWriter(tmp, width, int(shard_mb * (1 << 20)), with_domains)
        # the next batch is tokenised (both cores, GIL released) while this one is packed and written
        with ThreadPoolExecutor(1) as pool:
            pending = None
            for batch in itertools.chain(batched(reader), [None]):
                job = None if batch is None else (batch, pool.submit(tokenizer.encode_batch, [d.text for d in batch],
                                                                       [d.start_of_document for d in batch]))
                if pending:
                    writer.write(*packer.add(pending[0], pending[1].result()))
                    bar.update(reader.bytes_read - bar.n)
                pending = job
        writer.close()
        bar.close()
        if writer.rows < 2:
            raise ValueError(f"{writer.rows * width + len(packer.carry)} tokens make fewer than 2 samples of "
                             f"{width} tokens; add text or lower train_dataset.seq_length")
        meta = {"format": 2, "num_samples": writer.rows, "seq_length": seq_length, "tokens": writer.rows * width,
                "dropped_tail_tokens": len(packer.carry), "documents": packer.documents, "tokenizer": tokenizer.name,
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                "fingerprint": _fingerprint(paths, tokenizer.name, seq_length, text_key, domain_key),
                "sources": [os.path.abspath(p) for p in paths], "input_bytes": reader.total_bytes,
                "files": writer.files}
        if with_domains:
            meta["domains"] = list(packer.domains)
        write_text_atomic(os.path.join(tmp, METADATA), json.dumps(meta, indent=2))
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    return meta


def cached_dataset(source: str, tokenizer, seq_length: int, cache_root: str,
                   domain_key: Optional[str] = None) -> str:
    """A MindRecord directory for a raw text/JSONL file, built once into ``cache_root`` (keyed by content, and by
    ``domain_key``: the JSONL field of each document's domain label, see ``preprocess``)."""
    key = _fingerprint([source], tokenizer.name, seq_length, domain_key=domain_key)
    out = os.path.join(cache_root, f"{os.path.splitext(os.path.basename(source))[0]}-{key}")
    if not os.path.isfile(os.path.join(out, METADATA)):
        os.makedirs(cache_root, exist_ok=True)
        preprocess([source], tokenizer, seq_length, out, domain_key=domain_key, reap=False)
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
        if "files" in self.meta:
            self.files = [os.path.join(path, f) for f in self.meta["files"]]
        else:  # format 1: one FileWriter's data.mindrecord0..N-1
            self.files = sorted(os.path.join(path, f) for f in os.listdir(path)
                                if f.startswith("data.mindrecord") and not f.endswith(".db"))
        self.domains = list(self.meta.get("domains", []))
        if not self.files:
            raise FileNotFoundError(f"'{path}' holds no MindRecord shards")
        self.path = path
        n_eval = int(np.ceil(self.num_samples * eval_fraction)) if eval_fraction > 0 else 0
        self.train_indices = np.arange(self.num_samples - n_eval)
        self.eval_indices = np.arange(self.num_samples - n_eval, self.num_samples)

    def read(self, indices: Sequence[int], column: str = "input_ids") -> np.ndarray:
        """Samples in the given order, [len(indices), seq_length + 1] int32, through mindspore.dataset.
        ``column``: ``input_ids``, or ``domain_ids`` (per-token domain index into ``self.domains``) when the dataset
        was built with domain labels."""
        import mindspore.dataset as ds

        if column not in ("input_ids", "domain_ids") or (column == "domain_ids" and not self.domains):
            raise ValueError(f"dataset '{self.path}' has no column '{column}'"
                             + (" (it was preprocessed without --domain-key)" if column == "domain_ids" else ""))
        data = ds.MindDataset(self.files, columns_list=[column], sampler=ds.SubsetSampler(list(map(int, indices))))
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
