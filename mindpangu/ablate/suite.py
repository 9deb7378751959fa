"""Ablation suites: ``yaml_configs/ablations/NAME.yaml`` read into a checked spec, expanded into runs.

A suite file (YAML, ``safe_load``)::

    suite: stability                      # must match the file name
    title: "..."                          # one line for the report
    base: ../pangu_ultra_moe/tiny.yaml    # the base recipe, relative to the suite file
    data: domains                         # bundled corpus: domains | shakespeare, or a path
    overrides: {model.num_layers: 24}     # dotted keys applied to every run
    arms:                                 # each arm: the switches that differ (dotted keys)
      pre_ln/baseline: {model.norm_layout: pre_ln, model.init_method: baseline}
    learning_rates: [1.0e-3, 3.0e-3]      # optional grid over lr_schedule.learning_rate
    seeds: 2                              # seeds 0..n-1 (the run's seed is base seed + index)
    analysis: [stability]                 # probes after each run: stability, routing, mtp
    target_loss: 2.5                      # optional: tokens_to_target, when the train loss first reaches it
    scales:                               # smoke | default | full: overrides of the keys above
      smoke: {seeds: 1, overrides: {runner_config.train_steps: 3}}
    claims:                               # what the report checks (mindpangu/ablate/report.py)
      - {id: A1, source: "...", paper: "...", metric: grad_spike_score, baseline: pre_ln/baseline,
         treatment: dssn/baseline, expect: lower}

Errors name the file, the key and what is allowed (``SuiteError``), before any run starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

SCALES = ("smoke", "default", "full")
ANALYSES = ("stability", "routing", "mtp")
EXPECT = ("lower", "higher", "positive", "negative")
BUNDLED_DATA = {"domains": ("data", "domains", "corpus.jsonl"), "shakespeare": ("data", "shakespeare", "plays.txt")}
SUITE_DIR = os.path.join("yaml_configs", "ablations")
_TOP_KEYS = {"suite", "title", "base", "data", "overrides", "arms", "learning_rates", "seeds", "analysis",
             "scales", "claims", "notes", "target_loss"}
_SCALE_KEYS = {"overrides", "learning_rates", "seeds", "notes"}
_CLAIM_KEYS = {"id", "source", "paper", "metric", "baseline", "treatment", "expect", "arm", "note"}


class SuiteError(ValueError):
    """A suite file that cannot run: ``'<file>': <key>: <problem> (allowed: ...)``."""


def repo_root() -> str:
    """The directory holding ``yaml_configs/`` and ``data/`` (the checkout; an editable install)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def suite_path(name: str) -> str:
    """``NAME`` -> ``yaml_configs/ablations/NAME.yaml`` of the checkout; a path to a YAML file is used as it is."""
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return name
    return os.path.join(repo_root(), SUITE_DIR, f"{name}.yaml")


def available_suites() -> List[str]:
    """Names of the suites under ``yaml_configs/ablations/`` of the checkout, sorted."""
    d = os.path.join(repo_root(), SUITE_DIR)
    return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".yaml")) if os.path.isdir(d) else []


@dataclass
class Claim:
    """One published statement and how our numbers test it.

    ``expect``: lower / higher: ``treatment`` arm's metric below / above ``baseline``'s (paired by seed and learning
    rate); positive / negative: the metric of ``arm`` above / below 0 (e.g. a slope)."""
    id: str
    source: str
    paper: str
    metric: str
    expect: str
    baseline: str = ""
    treatment: str = ""
    arm: str = ""
    note: str = ""


@dataclass
class Run:
    """One training run of a suite: an arm at a learning rate and seed, with every override it applies."""
    arm: str
    seed_index: int
    lr: Optional[float]
    overrides: Dict[str, Any]

    @property
    def key(self) -> str:
        """The run's directory under ``<out>/runs/`` (also its row id in results.csv)."""
        lr = "" if self.lr is None else f"/lr{self.lr:g}"
        return f"{self.arm}{lr}/seed{self.seed_index}"


@dataclass
class Suite:
    """A suite file read at one scale (``load_suite``): paths are absolute, ``overrides`` merge the suite's and the
    scale's, ``runs`` is the expansion (arms x learning rates x seeds)."""
    name: str
    path: str
    title: str
    base: str
    data: str
    scale: str
    overrides: Dict[str, Any]
    arms: Dict[str, Dict[str, Any]]
    learning_rates: List[float]
    seeds: int
    analysis: List[str]
    claims: List[Claim]
    notes: str = ""
    target_loss: Optional[float] = None
    runs: List[Run] = field(default_factory=list)

    def expand(self) -> List[Run]:
        """Arms x learning rates x seeds, arm-major (so a suite's first runs cover one arm's grid)."""
        runs = []
        for arm, switches in self.arms.items():
            for lr in self.learning_rates or [None]:
                for s in range(self.seeds):
                    o = dict(self.overrides)
                    o.update(switches)
                    if lr is not None:
                        o["lr_schedule.learning_rate"] = lr
                    runs.append(Run(arm, s, lr, o))
        return runs


def _fail(path: str, key: str, problem: str, allowed: str = "") -> None:
    raise SuiteError(f"'{path}': {key}: {problem}" + (f" (allowed: {allowed})" if allowed else ""))


def _mapping(path: str, key: str, value, what: str = "a mapping of dotted config keys to values") -> Dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(path, key, f"must be {what}", "e.g. {model.num_layers: 24}")
    return dict(value)


def load_suite(name: str, scale: str = "default", seeds: Optional[int] = None) -> Suite:
    """Read and check suite ``name`` (a name under yaml_configs/ablations/ or a path) at ``scale``; ``seeds``
    overrides the scale's seed count. Raises SuiteError (file, key, allowed values) or FileNotFoundError."""
    path = suite_path(name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ablation suite '{name}' ({path}); available: {', '.join(available_suites())}")
    if scale not in SCALES:
        _fail(path, "--scale", f"unknown scale '{scale}'", " | ".join(SCALES))
    with open(path, encoding="utf-8") as fh:
        try:
            raw = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise SuiteError(f"'{path}': not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        _fail(path, "<top>", "must be a mapping")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        _fail(path, unknown[0], "unknown key", ", ".join(sorted(_TOP_KEYS)))
    stem = os.path.splitext(os.path.basename(path))[0]
    if raw.get("suite") != stem:
        _fail(path, "suite", f"must be the file's name '{stem}', got {raw.get('suite')!r}")
    scales = _mapping(path, "scales", raw.get("scales"), "a mapping smoke|default|full -> overrides of the suite")
    for s in scales:
        if s not in SCALES:
            _fail(path, f"scales.{s}", "unknown scale", " | ".join(SCALES))
    top = scales.get(scale) or {}
    if not isinstance(top, dict) or set(top) - _SCALE_KEYS:
        _fail(path, f"scales.{scale}", f"may only set {', '.join(sorted(_SCALE_KEYS))}")
    overrides = _mapping(path, "overrides", raw.get("overrides"))
    overrides.update(_mapping(path, f"scales.{scale}.overrides", top.get("overrides")))
    arms_raw = raw.get("arms")
    if not isinstance(arms_raw, dict) or not arms_raw:
        _fail(path, "arms", "needs at least one arm: name -> {dotted key: value}")
    arms = {str(a): _mapping(path, f"arms.{a}", v) for a, v in arms_raw.items()}
    lrs = top.get("learning_rates", raw.get("learning_rates")) or []
    if not isinstance(lrs, list) or not all(isinstance(x, (int, float)) and x > 0 for x in lrs):
        _fail(path, "learning_rates", "must be a list of positive numbers", "e.g. [1.0e-3, 3.0e-3]")
    n_seeds = seeds if seeds is not None else top.get("seeds", raw.get("seeds", 1))
    if not isinstance(n_seeds, int) or n_seeds < 1:
        _fail(path, "seeds", f"must be an integer >= 1, got {n_seeds!r}")
    analysis = raw.get("analysis") or []
    if not isinstance(analysis, list) or any(a not in ANALYSES for a in analysis):
        _fail(path, "analysis", f"unknown probe in {analysis!r}", " | ".join(ANALYSES))
    data = raw.get("data", "domains")
    if data in BUNDLED_DATA:
        data_path = os.path.join(repo_root(), *BUNDLED_DATA[data])
    else:
        data_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), str(data)))
    if not os.path.exists(data_path):
        _fail(path, "data", f"'{data_path}' does not exist", " | ".join(BUNDLED_DATA) + " or a path")
    base = raw.get("base")
    if not isinstance(base, str):
        _fail(path, "base", "must name the base recipe (a YAML path relative to the suite file)")
    base_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), base))
    if not os.path.isfile(base_path):
        _fail(path, "base", f"'{base_path}' does not exist")
    claims = []
    for i, c in enumerate(raw.get("claims") or []):
        if not isinstance(c, dict) or set(c) - _CLAIM_KEYS:
            _fail(path, f"claims[{i}]", f"must be a mapping of {', '.join(sorted(_CLAIM_KEYS))}")
        claim = Claim(**{k: str(v) for k, v in c.items()})
        if claim.expect not in EXPECT:
            _fail(path, f"claims[{i}].expect", f"unknown '{claim.expect}'", " | ".join(EXPECT))
        pair = claim.expect in ("lower", "higher")
        for key in (("baseline", "treatment") if pair else ("arm",)):
            if getattr(claim, key) not in arms:
                _fail(path, f"claims[{i}].{key}", f"'{getattr(claim, key)}' is not an arm", ", ".join(arms))
        claims.append(claim)
    target = raw.get("target_loss")
    if target is not None and not (isinstance(target, (int, float)) and target > 0):
        _fail(path, "target_loss", f"must be a positive number, got {target!r}")
    suite = Suite(stem, path, str(raw.get("title", stem)), base_path, data_path, scale, overrides, arms,
                  [float(x) for x in lrs], n_seeds, list(analysis), claims,
                  str(top.get("notes", raw.get("notes", ""))), None if target is None else float(target))
    suite.runs = suite.expand()
    return suite
