"""Streaming preprocessing against a reference written from the dataset format (whole documents encoded one at a
time, joined with the end-of-document id, cut into samples), the plain-text splitting rule on its own, bad input
and interrupted runs."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tokenizers import Tokenizer

from mindpangu.cli import preprocess_main
from mindpangu.data.corpus import split_text
from mindpangu.data.mindrecord import PackedDataset, preprocess
from mindpangu.data.tokenizer import ByteTokenizer, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BPE = os.path.join(ROOT, "data", "shakespeare", "tokenizer.json")
PLAYS = os.path.join(ROOT, "data", "shakespeare", "plays.txt")


def _documents(rng, n):
    paragraphs = open(PLAYS, encoding="utf-8").read().split("\n\n")
    docs = []
    for i in range(n):
        start = int(rng.integers(0, len(paragraphs) - 40))
        docs.append({"text": "\n\n".join(paragraphs[start:start + int(rng.integers(1, 40))]), "src": f"d{i % 3}"})
    docs[3]["text"] = ""  # an empty document is just its end-of-document id
    docs[5]["text"] = "naïve — café ☃ 日本語\r\nline two"  # multi-byte UTF-8, a CR inside JSON
    return docs


def _write_jsonl(path, docs, opener=open):
    with opener(path, "wt", encoding="utf-8") as fh:
        for i, d in enumerate(docs):
            fh.write(json.dumps(d) + "\n")
            if i == 2:
                fh.write("\n")  # blank lines are skipped


def _reference_samples(docs, encode, eos, width):
    ids = []
    for d in docs:
        ids.extend(encode(d["text"]))
        ids.append(eos)
    n = len(ids) // width
    return np.asarray(ids[: n * width], np.int64).reshape(n, width)


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_jsonl_stream_equals_one_document_at_a_time(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    docs = _documents(rng, 60)
    _write_jsonl(tmp_path / "a-1.jsonl", docs[:25])
    _write_jsonl(tmp_path / "a-2.jsonl.gz", docs[25:50], gzip.open)  # a glob picks up both, in name order
    _write_jsonl(tmp_path / "b.jsonl", docs[50:])
    if tokenizer == "bpe":
        peer = Tokenizer.from_file(BPE)
        encode, eos = (lambda t: peer.encode(t).ids), peer.token_to_id("<|endoftext|>")
    else:
        encode, eos = (lambda t: list(t.encode("utf-8"))), 256
    width = 65
    expected = _reference_samples(docs, encode, eos, width)
    meta = preprocess([str(tmp_path / "a-*.jsonl*"), str(tmp_path / "b.jsonl")], load_tokenizer(
        BPE if tokenizer == "bpe" else "byte"), width - 1, str(tmp_path / "ds"), shard_mb=0.05, progress=False)
    ds = PackedDataset(str(tmp_path / "ds"))
    assert len(ds.files) >= 3 and meta["files"] == [os.path.basename(f) for f in ds.files]  # shards rotated
    assert ds.num_samples == len(expected) and meta["documents"] == len(docs)
    np.testing.assert_array_equal(ds.read(range(ds.num_samples)), expected)


def test_domain_labels_follow_the_documents(tmp_path):
    docs = _documents(np.random.default_rng(1), 12)
    _write_jsonl(tmp_path / "web.jsonl", docs)
    (tmp_path / "code.txt").write_text("def f(x):\n    return x\n" * 200, encoding="utf-8")
    width = 33
    preprocess([str(tmp_path / "web.jsonl"), str(tmp_path / "code.txt")], ByteTokenizer(), width - 1,
               str(tmp_path / "ds"), domain_key="src", progress=False)
    ds = PackedDataset(str(tmp_path / "ds"))
    labels = []
    for d in docs:
        labels += [d["src"]] * (len(d["text"].encode("utf-8")) + 1)
    labels += ["code"] * (len("def f(x):\n    return x\n".encode()) * 200 + 1)
    n = len(labels) // width
    got = np.asarray(ds.domains)[ds.read(range(ds.num_samples), "domain_ids")]
    np.testing.assert_array_equal(got, np.asarray(labels[: n * width]).reshape(n, width))
    assert sorted(ds.domains) == ["code", "d0", "d1", "d2"]
    with pytest.raises(ValueError, match="no column 'domain_ids'"):
        preprocess([str(tmp_path / "code.txt")], ByteTokenizer(), 8, str(tmp_path / "plain"), progress=False)
        PackedDataset(str(tmp_path / "plain")).read([0], "domain_ids")


def test_split_text_rule():
    # a blank line is preferred (cut between its two line breaks), then a line break, then a space, then the limit
    assert split_text("aa bb\ncc\n\ndd ee", 12) == (["aa bb\ncc\n", "\ndd ee"], "")
    assert split_text("aa bb\ncc dd ee", 10) == (["aa bb", "\ncc dd ee"], "")
    assert split_text("aa bb cc dd", 7) == (["aa bb", " cc dd"], "")
    assert split_text("abcdefghij", 4) == (["abcd", "efgh", "ij"], "")
    assert split_text("a\n\n\nb", 3) == (["a\n\n", "\nb"], "")  # inside the last blank line of a run
    assert split_text("short", 10) == (["short"], "")
    assert split_text("aa bb cc", 5, final=False) == (["aa", " bb"], " cc")  # the unfinished tail waits
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("ab \n"), 5000))
    pieces, rest = split_text(text, 37)
    assert "".join(pieces) == text and rest == "" and max(map(len, pieces)) <= 37


@pytest.mark.parametrize("variant", ["paragraphs", "lines", "spaces"])
def test_split_text_keeps_byte_level_bpe_ids(variant):
    """Encoding the pieces gives the ids of encoding the whole text for the bundled byte-level BPE, whichever kind
    of cut the text allows."""
    text = open(PLAYS, encoding="utf-8").read()[:200_000]
    text = {"paragraphs": text, "lines": text.replace("\n\n", "\n"), "spaces": text.replace("\n", " ")}[variant]
    tok = Tokenizer.from_file(BPE)
    pieces, _ = split_text(text, 500)
    assert len(pieces) > 300
    assert sum((e.ids for e in tok.encode_batch(pieces)), []) == tok.encode(text).ids


def test_streamed_plain_text_equals_the_whole_file_encoded_once(tmp_path):
    """The reader's pieces across its 64 KiB reads, through preprocess, with the bundled BPE: the ids of the whole
    file encoded at once by ``tokenizers``, then the end-of-document id."""
    text = open(PLAYS, encoding="utf-8").read()[:300_000]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    peer = Tokenizer.from_file(BPE)
    ids = peer.encode(text).ids + [peer.token_to_id("<|endoftext|>")]
    width = 129
    n = len(ids) // width
    preprocess([str(tmp_path / "t.txt")], load_tokenizer(BPE), width - 1, str(tmp_path / "ds"), progress=False)
    ds = PackedDataset(str(tmp_path / "ds"))
    np.testing.assert_array_equal(ds.read(range(ds.num_samples)), np.asarray(ids[: n * width]).reshape(n, width))


def test_bad_input_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:4: expected a JSON object with a 'text' string"):
        preprocess([str(bad)], ByteTokenizer(), 8, str(tmp_path / "ds"), progress=False)
    bad.write_text('{"text": "ok"}\n{"text": "x"\n', encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        preprocess_main(["--input", str(bad), "--out", str(tmp_path / "ds"), "--seq-length", "8"])
    assert e.value.code == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    bad.write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8"):
        preprocess([str(bad)], ByteTokenizer(), 8, str(tmp_path / "ds"), progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8"):
        preprocess([str(tmp_path / "latin1.txt")], ByteTokenizer(), 8, str(tmp_path / "ds"), progress=False)
    with pytest.raises(FileNotFoundError, match=r"input '.*nothing\*.jsonl' matches no file"):
        preprocess([str(tmp_path / "nothing*.jsonl")], ByteTokenizer(), 8, str(tmp_path / "ds"), progress=False)
    assert not any(p.name.startswith("ds") for p in tmp_path.iterdir())  # nothing half-written is left


class _FailingTokenizer(ByteTokenizer):
    def __init__(self, after):
        self.calls, self.after = 0, after

    def encode_batch(self, texts, special=None):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return super().encode_batch(texts, special)


def test_interrupted_run_keeps_the_previous_dataset(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be\n\n" * 2_000, encoding="utf-8")
    preprocess([str(corpus)], ByteTokenizer(), 64, str(tmp_path / "ds"), progress=False)
    before = PackedDataset(str(tmp_path / "ds")).read([0, 1])
    corpus.write_text("something else entirely\n\n" * 200_000, encoding="utf-8")  # 5 MB: batches of ~1 MiB
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(corpus)], _FailingTokenizer(after=2), 64, str(tmp_path / "ds"), progress=False)
    np.testing.assert_array_equal(PackedDataset(str(tmp_path / "ds")).read([0, 1]), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "ds"]


def test_killed_run_leaves_nothing_that_loads(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("all the world's a stage\n\n" * 1_500_000, encoding="utf-8")  # 37 MB: seconds of work
    out = tmp_path / "ds"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                             str(corpus), "--out", str(out), "--seq-length", "127", "--shard-mb", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f"ds.tmp{proc.pid}"
    deadline = time.time() + 120
    while not (staging.is_dir() and len(list(staging.glob("data-*.mindrecord"))) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(FileNotFoundError):
        PackedDataset(str(out))
    with pytest.raises(FileNotFoundError, match="not a preprocessed dataset"):
        PackedDataset(str(staging))
    (tmp_path / "small.txt").write_text("a new start\n" * 100, encoding="utf-8")
    preprocess([str(tmp_path / "small.txt")], ByteTokenizer(), 8, str(out), progress=False)
    assert not staging.exists()  # the next run into the same place clears the dead run's staging directory
