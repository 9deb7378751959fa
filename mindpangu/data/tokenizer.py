"""Tokenizers: a built-in byte-level default, or a Hugging Face ``tokenizer.json`` (through ``tokenizers``)."""
from __future__ import annotations

import os
from typing import Iterable, List, Optional, Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end-of-document 256. Needs no file."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str], special: Optional[Sequence[bool]] = None) -> List[np.ndarray]:
        """The ids of each text, int32 arrays (this tokenizer has no special tokens to add)."""
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json``; the end-of-document id is the first of its known EOS tokens."""

    EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>")

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises its own Exception subclass
            raise ValueError(f"cannot read tokenizer '{path}': {e}") from None
        self.name = os.path.abspath(path)
        self.vocab_size = self._tok.get_vocab_size()
        ids = [self._tok.token_to_id(t) for t in self.EOS_TOKENS]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(f"tokenizer '{path}' has no end-of-text token (one of {', '.join(self.EOS_TOKENS)})")
        self.eos_id = ids[0]

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str], special: Optional[Sequence[bool]] = None) -> List[np.ndarray]:
        """The ids of each text, int32 arrays; ``tokenizers`` encodes the batch on all cores (GIL released).
        ``special[i]`` False encodes text i without the post-processor's special tokens (a piece that continues a
        document); default: with them, as ``encode`` does."""
        texts = list(texts)
        special = [True] * len(texts) if special is None else list(special)
        out: List[Optional[np.ndarray]] = [None] * len(texts)
        for flag in (True, False):
            idx = [i for i, s in enumerate(special) if s == flag]
            if idx:
                encoded = self._tok.encode_batch([texts[i] for i in idx], add_special_tokens=flag)
                for i, e in zip(idx, encoded):
                    out[i] = np.asarray(e.ids, np.int32)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(spec: str):
    """``"byte"`` (or empty) for the built-in byte tokenizer, else a path to a tokenizer.json."""
    if not spec or spec == "byte":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"tokenizer file '{spec}' does not exist (use 'byte' for the built-in one)")
    return HFTokenizer(spec)


def train_bpe(text_files: List[str], vocab_size: int, out_path: str) -> None:
    """Train a byte-level BPE tokenizer (with <|endoftext|>) on text files and write tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(text_files, trainer)
    tmp = out_path + ".tmp"
    tok.save(tmp)
    os.replace(tmp, out_path)
