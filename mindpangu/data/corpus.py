"""Corpus files as a stream of documents: plain text, JSONL, either gzip-compressed; globs; the text-splitting rule.

Nothing here holds more than one bounded piece of a file in memory, so a corpus of any size streams through.

* **JSONL** (``.jsonl``, ``.json``; ``.gz`` allowed): one JSON object per line, its ``text_key`` string is a
  document; empty lines are skipped; a line that is not such an object is an error naming file and line.
* **Plain text** (every other suffix; ``.gz`` allowed): the whole file is **one** document (as before streaming),
  read in pieces of at most ``chunk_chars`` characters by :func:`split_text`. Each piece is tokenised on its own
  (the tokenizer's special tokens only on the first) and the pieces are joined without an end-of-document id.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
CHUNK_CHARS = 4096  # measured: the bundled BPE encodes 4 KiB pieces in a batch ~1.6x faster than 64 KiB ones

# Cut points of the text-splitting rule, best first. Each cut falls just before the last whitespace character of a
# whitespace run that is followed by a non-space character: byte-level BPE pre-tokenizers (GPT-2's regex, the
# bundled tokenizer's) split there anyway, so encoding the pieces gives the same ids as encoding the whole text.
_CUTS = (re.compile(r"(?<=\n)(?=\n\S)"),   # inside a blank line, before the paragraph that follows
         re.compile(r"(?=\n\S)"),          # before a line break
         re.compile(r"(?=\s\S)"))          # before a space


def split_text(text: str, max_chars: int, final: bool = True) -> Tuple[List[str], str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters: ``(pieces, rest)``, ``"".join(pieces) + rest
    == text``. Each piece ends at the last cut point within its first ``max_chars`` characters, choosing, in order,
    a blank line (between its two line breaks), a line break, a space, and failing all three ``max_chars`` exactly
    (only there can the ids differ from encoding the whole text). With ``final=False`` the text continues in a later
    call, so an unfinished tail (up to ``max_chars`` characters) is returned as ``rest`` instead of as a piece.

    Raises ValueError if ``max_chars`` < 2.
    """
    if max_chars < 2:
        raise ValueError(f"max_chars must be >= 2, got {max_chars}")
    pieces, start = [], 0
    while len(text) - start > max_chars:
        # a cut at position p needs text[p + 1], so look one character past the window
        window_end = start + max_chars + 1
        cut = 0
        for pattern in _CUTS:
            for m in pattern.finditer(text, start + 1, window_end):
                cut = m.start()
            if cut:
                break
        cut = cut or start + max_chars
        pieces.append(text[start:cut])
        start = cut
    rest = text[start:]
    if final and rest:
        pieces.append(rest)
        rest = ""
    return pieces, rest


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files named by paths and glob patterns, in the order given (each glob's matches sorted), without repeats.

    Raises FileNotFoundError naming a pattern that matches no file (or a directory given instead of files).
    """
    files: List[str] = []
    seen = set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            what = "is a directory (give its files or a glob such as dir/*.jsonl)" if os.path.isdir(pattern) \
                else "matches no file" if glob.has_magic(pattern) else "does not exist"
            raise FileNotFoundError(f"input '{pattern}' {what}")
        for m in matches:
            if m not in seen:
                seen.add(m)
                files.append(m)
    return files


def is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(JSONL_SUFFIXES)


@dataclass(frozen=True)
class Document:
    """A document, or one piece of a plain-text document (``end_of_document`` False on all pieces but the last,
    ``start_of_document`` False on all but the first: only there may a tokenizer add its special tokens)."""
    text: str
    domain: str = ""
    end_of_document: bool = True
    start_of_document: bool = True


class CorpusReader:
    """Documents from files, streamed in order; ``bytes_read`` counts the input bytes consumed so far (compressed
    bytes for ``.gz``), for progress and throughput.

    ``domain_key``: when set, each JSONL document's domain label is that field (a string, required on every line);
    a plain-text file's domain is its file name without suffixes. Errors (not UTF-8, bad JSON line, missing field)
    are ValueError naming the file and line.
    """

    def __init__(self, paths: Sequence[str], text_key: str = "text", domain_key: Optional[str] = None,
                 chunk_chars: int = CHUNK_CHARS):
        self.paths = list(paths)
        self.text_key, self.domain_key, self.chunk_chars = text_key, domain_key, chunk_chars
        self.bytes_read = 0
        self.total_bytes = sum(os.path.getsize(p) for p in self.paths)

    def __iter__(self) -> Iterator[Document]:
        for path in self.paths:
            done = self.bytes_read
            with open(path, "rb") as raw:
                binary = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
                tell = lambda: done + raw.tell()  # noqa: E731
                try:
                    if is_jsonl(path):
                        yield from self._jsonl(path, binary, tell)
                    else:  # universal newlines, as open(path) reads text
                        yield from self._text(path, io.TextIOWrapper(binary, encoding="utf-8"), tell)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text near byte {raw.tell()} ({e.reason})") from None
                except (OSError, EOFError) as e:  # a truncated or corrupt .gz
                    raise ValueError(f"{path}: cannot read: {e}") from None
            self.bytes_read = done + os.path.getsize(path)

    def _text(self, path: str, fh: io.TextIOWrapper, tell: Callable[[], int]) -> Iterator[Document]:
        domain = os.path.basename(path).split(".")[0] if self.domain_key else ""
        rest, ended, first = "", False, True
        while not ended:
            block = fh.read(16 * self.chunk_chars)
            ended = not block
            pieces, rest = split_text(rest + block, self.chunk_chars, final=ended)
            self.bytes_read = tell()
            if ended and not pieces:  # an empty file is still a document (just the end-of-document id)
                pieces = [""]
            for i, piece in enumerate(pieces):
                yield Document(piece, domain, ended and i == len(pieces) - 1, first)
                first = False

    def _jsonl(self, path: str, fh: BinaryIO, tell: Callable[[], int]) -> Iterator[Document]:
        for n, raw_line in enumerate(fh, 1):
            if n % 256 == 0:
                self.bytes_read = tell()
            if not raw_line.strip():
                continue
            try:
                obj = json.loads(raw_line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start + 1} of the line)") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            text = obj.get(self.text_key) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: expected a JSON object with a '{self.text_key}' string "
                                 f"(--text-key names the field)")
            domain = ""
            if self.domain_key:
                domain = obj.get(self.domain_key)
                if not isinstance(domain, str) or not domain:
                    raise ValueError(f"{path}:{n}: expected a non-empty '{self.domain_key}' string (the domain "
                                     "label asked for with --domain-key)")
            yield Document(text, domain)


def read_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """The whole documents of one file (a plain-text file joined back into one string): for small files and tests."""
    parts: List[str] = []
    for doc in CorpusReader([path], text_key):
        parts.append(doc.text)
        if doc.end_of_document:
            yield "".join(parts)
            parts = []


def batched(docs: Iterable[Document], max_chars: int = 1 << 20, max_docs: int = 1024) -> Iterator[List[Document]]:
    """Consecutive documents in lists of at most ``max_docs`` documents and about ``max_chars`` characters."""
    batch: List[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= max_chars or len(batch) >= max_docs:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
