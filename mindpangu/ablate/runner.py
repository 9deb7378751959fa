"""Run a suite: prepare the data once, run every (arm, learning rate, seed) in its own process (``worker.py``),
``jobs`` at a time, with one progress bar over the whole suite; then write results.csv, plots and report.md.

Layout of ``out``::

    runs/<arm>/[lr<lr>/]seed<i>/   spec.json, train.log, metrics.jsonl, checkpoints/, result.json (last)
    results.csv, arms.csv, report.md, *.png, invocations.jsonl

Resuming: a run whose result.json exists and whose spec.json equals the new spec is kept; any other run directory
is removed and the run redone from scratch (runs are deterministic, so a redone run gives the same numbers).
Every run uses ``context.runtime_num_threads: 1``, so its numbers do not depend on ``jobs``.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from ..config import load_config
from ..data.mindrecord import cached_dataset
from ..data.tokenizer import load_tokenizer
from ..fsutil import cache_root, write_text_atomic
from ..progress import progress_bar
from .suite import Run, Suite, SuiteError, repo_root
from .worker import RESULT, SPEC

INVOCATIONS = "invocations.jsonl"  # one line per mindpangu-ablate invocation: its wall time and the runs it ran
PID = "worker.pid"  # the process running a run, while it runs
DATA_KEYS = ("train_dataset.seq_length", "train_dataset.tokenizer", "train_dataset.data_path")


class SuiteFailed(RuntimeError):
    """Some runs of a suite failed (their logs are named)."""


def _overrides(values: Dict) -> List[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def prepare_data(suite: Suite) -> str:
    """The suite's corpus as a MindRecord directory in the cache (with domain labels for JSONL corpora whose
    lines carry a ``domain`` field), built once and shared by every run."""
    cfg = load_config(suite.base, _overrides(suite.overrides))
    d = cfg.train_dataset
    for run in suite.runs:
        for key in DATA_KEYS:
            if key in run.overrides and run.overrides[key] != suite.overrides.get(key, run.overrides[key]):
                raise SuiteError(f"'{suite.path}': arms.{run.arm}: {key} differs from the suite's; every run "
                                 "trains on the one prepared dataset (set it in the suite's overrides)")
    domain_key = None
    if suite.data.endswith((".jsonl", ".jsonl.gz")):
        with (gzip.open if suite.data.endswith(".gz") else open)(suite.data, "rt", encoding="utf-8") as fh:
            domain_key = "domain" if "domain" in json.loads(fh.readline()) else None
    return cached_dataset(suite.data, load_tokenizer(d.tokenizer), d.seq_length, os.path.join(cache_root(), "data"),
                          domain_key=domain_key)


def run_spec(suite: Suite, run: Run, out: str, data_dir: str) -> Dict:
    """What ``worker.py`` needs for one run (also what decides whether a finished run can be kept)."""
    cfg = load_config(suite.base, _overrides(run.overrides))  # the arm's config, checked before any run starts
    overrides = dict(run.overrides)
    overrides.update({"output_dir": os.path.join(out, "runs", run.key), "train_dataset.data_path": data_dir,
                      "seed": cfg.seed + run.seed_index, "logging.tensorboard": False,
                      "context.runtime_num_threads": 1, "resume_training": False})
    return {"suite": suite.name, "scale": suite.scale, "base": suite.base, "key": run.key, "arm": run.arm,
            "lr": run.lr, "seed_index": run.seed_index, "overrides": _overrides(overrides),
            "analysis": suite.analysis, "target_loss": suite.target_loss,
            "steps": cfg.runner_config.train_steps}


def _steps_done(path: str) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for line in fh if b'"kind": "train"' in line)
    except OSError:
        return 0


def run_suite(suite: Suite, out: str, jobs: int = 1, progress: bool = True,
              python: Optional[str] = None) -> List[Dict]:
    """Run every unfinished run of ``suite`` into ``out`` and return all results (expansion order).
    Raises SuiteFailed naming the failed runs' logs after the others finished."""
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    data_dir = prepare_data(suite)
    specs = [run_spec(suite, r, out, data_dir) for r in suite.runs]
    todo = []
    for spec in specs:
        d = os.path.join(out, "runs", spec["key"])
        if os.path.isfile(os.path.join(d, RESULT)) and _load(os.path.join(d, SPEC)) == spec:
            continue
        pid = _load(os.path.join(d, PID))
        if isinstance(pid, int) and _alive(pid):
            raise SuiteError(f"run '{spec['key']}' is still running in process {pid} (an earlier invocation); "
                             f"wait for it or kill it, then rerun")
        shutil.rmtree(d, ignore_errors=True)
        todo.append(spec)
    total = sum(s["steps"] for s in todo)
    bar = progress_bar(total=total, desc=f"{suite.name} ({len(specs) - len(todo)}/{len(specs)} runs done)",
                       unit="step", disable=not progress)
    env = dict(os.environ)
    env["PYTHONPATH"] = repo_root() + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("GLOG_v", "3")
    env["OMP_NUM_THREADS"] = "1"  # one thread per run, like the MindSpore runtime (results independent of --jobs)
    active: Dict[str, tuple] = {}
    failed, finished, credited = [], len(specs) - len(todo), {}
    queue = list(todo)
    try:
        while queue or active:
            while queue and len(active) < max(1, jobs):
                spec = queue.pop(0)
                d = os.path.join(out, "runs", spec["key"])
                os.makedirs(d, exist_ok=True)
                write_text_atomic(os.path.join(d, SPEC), json.dumps(spec, indent=1))
                log = open(os.path.join(d, "train.log"), "w", encoding="utf-8")
                proc = subprocess.Popen([python or sys.executable, "-m", "mindpangu.ablate.worker",
                                         os.path.join(d, SPEC)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                        preexec_fn=_die_with_parent)
                write_text_atomic(os.path.join(d, PID), str(proc.pid))
                active[spec["key"]] = (proc, log, spec, d)
                credited[spec["key"]] = 0
            time.sleep(0.5)
            for key, (proc, log, spec, d) in list(active.items()):
                done = _steps_done(os.path.join(d, "metrics.jsonl"))
                bar.update(max(0, min(done, spec["steps"]) - credited[key]))
                credited[key] = max(credited[key], min(done, spec["steps"]))
                if proc.poll() is None:
                    continue
                log.close()
                del active[key]
                if os.path.isfile(os.path.join(d, PID)):
                    os.remove(os.path.join(d, PID))
                bar.update(spec["steps"] - credited[key])  # a run that stopped early still counts as done
                if proc.returncode != 0 or not os.path.isfile(os.path.join(d, RESULT)):
                    failed.append(f"{key} (exit {proc.returncode}; log {os.path.join(d, 'train.log')})")
                finished += 1
                bar.set_description(f"{suite.name} ({finished}/{len(specs)} runs done)", refresh=False)
            if active:
                bar.set_postfix_str(", ".join(sorted(active)), refresh=False)
    except BaseException:
        for proc, log, _, _ in active.values():
            proc.kill()
            log.close()
        raise
    finally:
        bar.close()
    with open(os.path.join(out, INVOCATIONS), "a", encoding="utf-8") as fh:  # the report's suite time
        fh.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": time.time() - t0,
                             "runs_run": len(todo), "runs_failed": len(failed), "jobs": jobs}) + "\n")
    if failed:
        raise SuiteFailed(f"{len(failed)} of {len(specs)} runs of suite '{suite.name}' failed: " + "; ".join(failed))
    return [_load(os.path.join(out, "runs", s["key"], RESULT)) for s in specs]


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the runner dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so that no orphaned run writes into a directory a later invocation redoes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load(path: str):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None
