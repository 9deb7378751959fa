"""How corpus.jsonl was made (a one-off; nothing runs this at training time): three domains, each document
tagged with its domain, for the per-domain held-out loss and expert-specialisation metrics of mindpangu-ablate.

- verse: ../shakespeare/plays.txt (public domain), cut into scenes of at most CHUNK characters at blank lines.
- code: CPython 3.11 standard-library modules (PSF License Version 2, which permits redistribution with the
  licence notice: see README.md), cut the same way at blank lines.
- arithmetic: generated with a fixed seed: additions, subtractions, multiplications and long sums with answers.

The documents of the three domains are interleaved in proportion (document i of a domain with n documents goes
to position i / n) so that every slice of the file, including the held-out tail the trainer evaluates on, holds
all three in about equal shares of characters. Usage: python build.py  (Python 3.11; reads its stdlib).
"""
import json
import os
import random
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK = 2000        # characters per document, at most
PER_DOMAIN = 420_000  # characters per domain, about
STDLIB = ["textwrap", "heapq", "bisect", "fractions", "statistics", "colorsys", "difflib", "shlex", "string",
          "calendar", "glob", "fnmatch", "graphlib", "keyword", "numbers", "operator", "pprint", "queue",
          "random", "reprlib", "sched", "stat", "tabnanny", "timeit", "tokenize", "trace", "uuid", "weakref",
          "zipapp", "argparse", "base64", "contextlib", "copy", "csv", "dataclasses", "decimal", "enum",
          "functools", "gettext", "ipaddress", "locale", "mimetypes", "netrc", "optparse", "pathlib"]


def chunks(text, limit=CHUNK):
    """Pieces of at most ``limit`` characters, cut at blank lines (a paragraph longer than the limit is cut at
    its last line break in reach)."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        while len(para) > limit:
            cut = para.rfind("\n", 0, limit)
            cut = cut if cut > 0 else limit
            out.append(para[:cut])
            para = para[cut:].lstrip("\n")
        if cur and len(cur) + 2 + len(para) > limit:
            out.append(cur)
            cur = ""
        cur = para if not cur else cur + "\n\n" + para
    if cur:
        out.append(cur)
    return [c for c in out if c.strip()]


def take(pieces, budget):
    out, n = [], 0
    for p in pieces:
        if n >= budget:
            break
        out.append(p)
        n += len(p)
    return out


def verse():
    with open(os.path.join(HERE, "..", "shakespeare", "plays.txt"), encoding="utf-8") as fh:
        text = fh.read()
    return take(chunks(text[len(text) // 2:]), PER_DOMAIN)  # the second half: other plays than the first files


def code():
    lib = sysconfig.get_paths()["stdlib"]
    pieces = []
    for name in STDLIB:
        with open(os.path.join(lib, name + ".py"), encoding="utf-8") as fh:
            pieces += chunks(fh.read())
    return take(pieces, PER_DOMAIN)


def arithmetic():
    rng = random.Random(20261130)
    pieces = []
    while sum(map(len, pieces)) < PER_DOMAIN:
        lines = []
        for _ in range(rng.randint(20, 40)):
            kind = rng.randrange(4)
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            if kind == 0:
                lines.append(f"{a} + {b} = {a + b}")
            elif kind == 1:
                lines.append(f"{a} - {b} = {a - b}")
            elif kind == 2:
                a, b = rng.randint(0, 99), rng.randint(0, 99)
                lines.append(f"{a} * {b} = {a * b}")
            else:
                xs = [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]
                lines.append(" + ".join(map(str, xs)) + f" = {sum(xs)}")
        pieces.append("\n".join(lines))
    return pieces


if __name__ == "__main__":
    domains = {"verse": verse(), "code": code(), "arithmetic": arithmetic()}
    keyed = [((i + 0.5) / len(docs), d, name, text) for d, (name, docs) in enumerate(domains.items())
             for i, text in enumerate(docs)]
    rows = [{"domain": name, "text": text} for _, _, name, text in sorted(keyed)]
    with open(os.path.join(HERE, "corpus.jsonl"), "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    for name, docs in domains.items():
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs)):,} characters")
