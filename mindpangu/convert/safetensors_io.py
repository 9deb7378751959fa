"""safetensors files read lazily and written in shards, with the dtypes released checkpoints use.

The ``safetensors`` package's NumPy API has no bfloat16 or float8 (NumPy lacks those types), and its readers load a
whole file at once. This module implements the documented format
(https://github.com/huggingface/safetensors#format: an 8-byte little-endian header size, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw little-endian data) for exactly what the checkpoint
converters need:

- ``CheckpointReader``: a Hugging Face directory (one file, several files, or ``model.safetensors.index.json``
  shards) as name -> tensor, memory-mapped, each tensor decoded to float32 only when asked for: peak memory is one
  tensor, not the model. F32, F16, BF16 and F8_E4M3 (DeepSeek-V3's FP8 release: ``W`` with ``W_scale_inv`` per
  128 x 128 block, dequantised on read) are decoded.
- ``save_sharded``: transformers' layout (``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``,
  or one ``model.safetensors``), shards of at most ``max_shard_bytes``, float32 / float16 / bfloat16, written
  tensor by tensor.
Nothing is unpickled; names, shapes and offsets are validated against the file size.
"""
from __future__ import annotations

import glob
import json
import math
import os
import struct
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 2 ** 20  # the reference reader's limit on the JSON header
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3 FP8: "<weight>_scale_inv" holds the per-block dequantisation factors
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
          "BOOL": 1}
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _e4m3_table() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn codes (OCP FP8: bias 7, no infinities, S.1111.111 = NaN)."""
    codes = np.arange(256)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = sign * value
    value[(exp == 0xF) & (man == 0x7)] = np.nan
    return value.astype(np.float32)


E4M3 = _e4m3_table()


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw little-endian bytes (uint8 array) of safetensors ``dtype`` -> a float32 (or integer) array."""
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return E4M3[raw]
    if dtype not in _NUMPY:
        raise ValueError(f"safetensors dtype {dtype} is not supported (F32, F16, BF16, F8_E4M3, integers)")
    out = raw.view(_NUMPY[dtype])
    return out.astype(np.float32) if dtype in ("F16", "F64") else out


def encode(value: np.ndarray, dtype: str) -> bytes:
    """A float array as safetensors ``dtype`` bytes (F32, F16, or BF16 rounded to nearest even)."""
    value = np.ascontiguousarray(value, np.float32)
    if dtype == "F32":
        return value.tobytes()
    if dtype == "F16":
        return value.astype(np.float16).tobytes()
    if dtype == "BF16":
        bits = value.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded = np.where(np.isnan(value), np.uint16(0x7FC0), rounded)  # keep NaN a NaN
        return rounded.tobytes()
    raise ValueError(f"cannot write safetensors dtype {dtype}; allowed: {', '.join(OUT_DTYPES)}")


def read_header(path: str) -> Tuple[Dict[str, dict], int]:
    """(header without ``__metadata__``, offset of the data) of one safetensors file; ValueError if malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"'{path}' is not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER):
            raise ValueError(f"'{path}' is not a safetensors file (header size {n} exceeds the file or "
                             f"{MAX_HEADER} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"'{path}' is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"'{path}' is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int) \
                and isinstance(end, int) and 0 <= begin <= end
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"'{path}': tensor '{name}' has a malformed header entry {info!r}")
        if dtype not in _BYTES:
            raise ValueError(f"'{path}': tensor '{name}' has dtype {dtype}, which is not read (F32, F16, BF16, "
                             f"F8_E4M3, integers)")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * _BYTES[dtype] or 8 + n + end > size:
            raise ValueError(f"'{path}': tensor '{name}' ({dtype}, shape {shape}) does not match its bytes "
                             "(truncated or corrupt file)")
    return header, 8 + n


class CheckpointReader:
    """The tensors of a Hugging Face checkpoint directory, read one at a time (memory-mapped)."""

    def __init__(self, path: str, block: Sequence[int] = (128, 128)):
        index = os.path.join(path, INDEX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"'{index}' is not a safetensors index (no weight_map)") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
            if missing:
                raise FileNotFoundError(f"'{index}' names shards that are not there: {', '.join(missing[:4])}")
        else:
            files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in '{path}'")
        self.path, self.block = path, tuple(block)
        self._where: Dict[str, Tuple[str, dict, int]] = {}
        for f in files:
            header, start = read_header(os.path.join(path, f))
            for name, info in header.items():
                if name in self._where:
                    raise ValueError(f"tensor '{name}' appears in both '{self._where[name][0]}' and '{f}'")
                self._where[name] = (f, info, start)
        self._maps: Dict[str, np.memmap] = {}

    def names(self) -> List[str]:
        """Every tensor name, without the FP8 scale tensors (they are applied to their weights)."""
        return [n for n in self._where if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in self._where)]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> str:
        return self._where[name][1]["dtype"]

    def _raw(self, name: str) -> np.ndarray:
        f, info, start = self._where[name]
        if f not in self._maps:
            self._maps[f] = np.memmap(os.path.join(self.path, f), np.uint8, "r")
        begin, end = info["data_offsets"]
        return self._maps[f][start + begin: start + end]

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 (integers keep their type); an FP8 weight is multiplied by its
        ``_scale_inv`` block factors (DeepSeek-V3: one factor per ``block`` = 128 x 128 tile, edge tiles partial)."""
        value = decode(np.array(self._raw(name)), self.dtype(name)).reshape(self.shape(name))
        scale = name + SCALE_SUFFIX
        if self.dtype(name) == "F8_E4M3":
            if scale not in self._where:
                raise ValueError(f"FP8 tensor '{name}' has no '{scale}' to dequantise it with")
            factors = decode(np.array(self._raw(scale)), self.dtype(scale)).reshape(self.shape(scale))
            rows, cols = value.shape
            br, bc = self.block
            if factors.shape != (-(-rows // br), -(-cols // bc)):
                raise ValueError(f"'{scale}' has shape {factors.shape}; {name} {value.shape} in {br} x {bc} blocks "
                                 f"needs {(-(-rows // br), -(-cols // bc))}")
            value = value * np.repeat(np.repeat(factors, br, 0), bc, 1)[:rows, :cols]
        return value

    def close(self) -> None:
        self._maps.clear()


def plan_shards(entries: Sequence[Tuple[str, Tuple[int, ...]]], dtype: str, max_shard_bytes: int) -> List[List[str]]:
    """Tensor names in write order, cut into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * _BYTES[dtype]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_sharded(entries: Sequence[Tuple[str, Tuple[int, ...]]], get: Callable[[str], np.ndarray], out_dir: str,
                 dtype: str = "float32", max_shard_bytes: int = 5 * 10 ** 9,
                 progress: Optional[Callable[[int], None]] = None) -> List[str]:
    """Write tensors ``entries`` [(name, shape)] (values from ``get(name)``, fetched one at a time) into
    ``out_dir`` as transformers does: one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards of
    at most ``max_shard_bytes`` with ``model.safetensors.index.json``. Returns the file names."""
    code = OUT_DTYPES.get(dtype)
    if code is None:
        raise ValueError(f"cannot write dtype '{dtype}'; allowed: {', '.join(OUT_DTYPES)}")
    shapes = dict(entries)
    shards = plan_shards(entries, code, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, members in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in members:
            nbytes = int(np.prod(shapes[name], dtype=np.int64)) * _BYTES[code]
            header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
        with open(os.path.join(out_dir, file), "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            for name in members:
                value = get(name)
                if tuple(value.shape) != tuple(shapes[name]):
                    raise ValueError(f"tensor '{name}' has shape {value.shape}, planned {shapes[name]}")
                fh.write(encode(value, code))
                if progress:
                    progress(1)
        total += offset
    if len(shards) > 1:
        with open(os.path.join(out_dir, INDEX), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return names


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes (transformers' max_shard_size spelling). ValueError otherwise."""
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "B": 1}
    t = str(text).strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            t, mult = t[: -len(unit)], factor
            break
    else:
        mult = 1
    try:
        value = float(t) * mult
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise ValueError(f"cannot read size '{text}'; e.g. 5GB, 500MB, 2GiB")
    if value < 1:
        raise ValueError(f"size '{text}' must be at least 1 byte")
    return int(value)


def iter_names(reader: CheckpointReader) -> Iterable[str]:
    return iter(reader.names())
