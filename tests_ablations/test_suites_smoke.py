"""Every bundled ablation suite end to end at --scale smoke (a few steps, one seed), through the CLI: the files
it promises exist and agree with the runs; a rerun into another directory reproduces results.csv exactly (timing
columns aside); a run whose result is missing is redone on resume and the others are kept.

A CI step of its own (.ci/run): 19 minutes on a 2-core box with another suite running beside it."""
import csv
import json
import os
import shutil

import pytest

from mindpangu.ablate.report import TIMING_COLUMNS
from mindpangu.ablate.suite import available_suites, load_suite
from mindpangu.cli import ablate_main

SUITES = ["stability", "balance", "moge", "granularity", "dropless", "mtp"]


def _results(out, suite):
    """Every run's result.json (per-layer lists included) without its timing entries."""
    found = {}
    for run in suite.runs:
        with open(os.path.join(out, "runs", run.key, "result.json"), encoding="utf-8") as fh:
            found[run.key] = {k: v for k, v in json.load(fh).items() if k not in TIMING_COLUMNS}
    return found


def _rows(path):
    with open(path, encoding="utf-8") as fh:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    done = {}
    for name in SUITES:
        out = str(root / name)
        ablate_main(["--suite", name, "--scale", "smoke", "--out", out, "--no-progress"])
        done[name] = out
    return done


def test_bundled_suites_are_the_six():
    assert sorted(available_suites()) == sorted(SUITES)


@pytest.mark.parametrize("name", SUITES)
def test_suite_writes_its_files(outputs, name):
    out = outputs[name]
    suite = load_suite(name, "smoke")
    rows = _rows(os.path.join(out, "results.csv"))
    assert [r["run"] for r in rows] == [r.key for r in suite.runs]
    for r in rows:
        assert os.path.isfile(os.path.join(out, "runs", r["run"], "metrics.jsonl"))
        assert float(r["heldout_loss"]) > 0 and r["stopped"] == ""
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert report.count("| A") >= len(suite.claims)  # one row per claim
    for png in ("curves.png", "heldout_loss.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    extra = {"stability": ["gamma_depth_slope", "act_rms_spread_end"], "balance": ["kl_specialisation", "max_vio_batch"],
             "moge": ["imbalance_score_16"], "dropless": ["drop_rate"], "mtp": ["mtp_acceptance_rate"],
             "granularity": ["max_vio_global"]}[name]
    for col in extra:
        assert any(r.get(col) not in ("", None) for r in rows), col
    if name == "mtp":  # speculative decoding reproduces plain greedy decoding, token for token
        assert all(r["mtp_equals_greedy"] == "1" for r in rows)
    if name == "moge":  # MoGE puts the same number of tokens on every device: IS = 0 exactly
        assert all(float(r["imbalance_score_16"]) == 0.0 for r in rows if r["arm"].startswith("moge"))


def test_rerun_reproduces_results_and_resume_redoes_only_unfinished(outputs, tmp_path):
    first = outputs["moge"]
    again = str(tmp_path / "again")
    ablate_main(["--suite", "moge", "--scale", "smoke", "--out", again, "--no-progress"])
    assert _rows(os.path.join(again, "results.csv")) == _rows(os.path.join(first, "results.csv"))
    suite = load_suite("moge", "smoke")
    assert json.dumps(_results(again, suite)) == json.dumps(_results(first, suite))  # per-layer values too
    # an unfinished run (no result.json) is redone; finished ones are kept (their files untouched)
    victim, kept = suite.runs[0].key, suite.runs[1].key
    os.remove(os.path.join(again, "runs", victim, "result.json"))
    stamp = os.path.getmtime(os.path.join(again, "runs", kept, "result.json"))
    ablate_main(["--suite", "moge", "--scale", "smoke", "--out", again, "--no-progress"])
    assert os.path.getmtime(os.path.join(again, "runs", kept, "result.json")) == stamp
    assert _rows(os.path.join(again, "results.csv")) == _rows(os.path.join(first, "results.csv"))
    shutil.rmtree(again)
