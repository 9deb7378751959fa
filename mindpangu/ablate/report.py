"""A finished suite's files: results.csv (one row per run), arms.csv (per arm and seed, over the learning-rate
grid), PNG plots and report.md, whose claims table puts each paper statement beside our measured effect.

Verdicts (``verdict``): the effect is the treatment-minus-baseline difference of a metric, paired by learning rate
and seed (or the metric itself for a sign claim); with n finite pairs, mean d and standard error
se = std(d) / sqrt(n), a two-sided one-sample t-test at 5 %:
- agrees / disagrees: |d| >= t(0.975, n - 1) se in / against the paper's direction (n >= 2; t = 12.7, 4.30, 3.18
  for n = 2, 3, 4), or every pair differs by the same nonzero amount;
- inconclusive: otherwise (the effect is within the spread, there is one pair only, or there is no difference).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..fsutil import write_text_atomic
from ..metrics import lr_sensitivity
from .suite import Claim, Suite
from .worker import read_series

# columns that are measured time: a rerun reproduces every other column exactly
TIMING_COLUMNS = ("run_wall_s", "train_wall_s", "first_step_s", "tokens_per_s", "mtp_speedup")
_ID_COLUMNS = ("run", "arm", "lr", "seed_index", "seed")


def _scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def results_table(results: Sequence[Dict]) -> Tuple[List[str], List[Dict]]:
    """Columns (ids, then every scalar metric sorted, then timing) and rows of results.csv."""
    metrics = sorted({k for r in results for k, v in r.items()
                      if _scalar(v) and k not in _ID_COLUMNS and k not in TIMING_COLUMNS})
    timing = [c for c in TIMING_COLUMNS if any(c in r for r in results)]
    cols = list(_ID_COLUMNS) + metrics + ["stopped"] + timing
    return cols, [{c: r.get(c, "") for c in cols} for r in results]


def arm_table(suite: Suite, results: Sequence[Dict]) -> List[Dict]:
    """Per (arm, seed) over the learning-rate grid: lr_sensitivity of the held-out loss (``metrics.lr_sensitivity``
    with the run's first-step loss as the loss at init), the divergences and the best learning rate."""
    rows = []
    for arm in suite.arms:
        for s in range(suite.seeds):
            runs = [r for r in results if r["arm"] == arm and r["seed_index"] == s]
            if not runs:
                continue
            row = {"arm": arm, "seed_index": s, "divergences": sum(int(r.get("diverged", 0)) for r in runs)}
            if len(suite.learning_rates) > 1:
                init = float(np.mean([r["initial_loss"] for r in runs if math.isfinite(r["initial_loss"])]))
                losses = [r["heldout_loss"] for r in sorted(runs, key=lambda r: r["lr"])]
                row["lr_sensitivity"] = lr_sensitivity(losses, init)
                finite = [(r["heldout_loss"], r["lr"]) for r in runs if math.isfinite(r["heldout_loss"])]
                row["best_lr"] = min(finite)[1] if finite else float("nan")
            rows.append(row)
    return rows


def _values(rows: Sequence[Dict], arm: str, metric: str) -> Dict[Tuple, float]:
    out = {}
    for r in rows:
        if r.get("arm") == arm and metric in r and _scalar(r[metric]):
            out[(r.get("lr"), r.get("seed_index"))] = float(r[metric])
    return out


# two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (beyond: 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    """Student's t two-sided 5 % critical value for ``df`` >= 1 degrees of freedom."""
    return _T975[df - 1] if df <= len(_T975) else 1.96


def verdict(effect: Sequence[float], expect: str) -> Tuple[str, str]:
    """(agrees | disagrees | inconclusive, why) for paired effects (treatment - baseline, or values for a sign
    claim) against ``expect`` (lower / negative: effect < 0; higher / positive: effect > 0); see the module
    docstring for the rule."""
    d = np.asarray([x for x in effect if math.isfinite(x)], np.float64)
    if len(d) == 0:
        return "inconclusive", "not measured (no finite pairs)"
    if np.all(d == 0):
        return "inconclusive", "no difference at this scale"
    if len(d) == 1:
        return "inconclusive", "one pair only: no spread to judge it against"
    mean, se = d.mean(), d.std(ddof=1) / math.sqrt(len(d))
    want = -1 if expect in ("lower", "negative") else 1
    bound = t_critical(len(d) - 1) * se
    if abs(mean) >= bound:
        side = "" if np.sign(mean) == want else " against the paper"
        return ("agrees" if not side else "disagrees",
                f"effect {mean:+.4g}{side}, beyond the 95 % bound {bound:.3g} (t-test, n={len(d)})")
    return "inconclusive", f"effect {mean:+.4g} within the 95 % bound {bound:.3g} (t-test, n={len(d)})"


def _ms(xs: Sequence[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "n/a"
    return f"{np.mean(xs):.4g} ± {np.std(xs, ddof=1):.2g}" if len(xs) > 1 else f"{xs[0]:.4g}"


def evaluate_claims(suite: Suite, results: Sequence[Dict], arms: Sequence[Dict]) -> List[Dict]:
    """Each claim with our numbers: baseline and treatment mean ± std, effect mean ± std, n, verdict, why."""
    out = []
    for c in suite.claims:
        rows = arms if any(c.metric in a for a in arms) else results
        if c.expect in ("lower", "higher"):
            base, treat = _values(rows, c.baseline, c.metric), _values(rows, c.treatment, c.metric)
            keys = sorted(set(base) & set(treat), key=str)
            effect = [treat[k] - base[k] for k in keys]
            ours = f"{c.baseline}: {_ms([base[k] for k in keys])}; {c.treatment}: {_ms([treat[k] for k in keys])}"
        else:
            vals = _values(rows, c.arm, c.metric)
            effect = list(vals.values())
            ours = f"{c.arm}: {_ms(effect)}"
        v, why = verdict(effect, c.expect)
        n = sum(1 for x in effect if math.isfinite(x))
        out.append({"claim": c, "ours": ours, "effect": _ms(effect), "n": n, "verdict": v, "why": why})
    return out


def _write_csv(path: str, cols: Sequence[str], rows: Sequence[Dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    write_text_atomic(path, buf.getvalue())


def _save(fig, out: str, name: str, files: List[str]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    files.append(name)


def plots(suite: Suite, results: Sequence[Dict], arms: Sequence[Dict], out: str) -> List[str]:
    """PNG files (names relative to ``out``): training curves, held-out loss per arm (vs the learning rate when
    there is a grid), and the suite-specific views that exist in the results (per-layer gamma and activation RMS,
    per-domain expert shares, drop rate per layer, imbalance by batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    lrs = suite.learning_rates
    mid = lrs[len(lrs) // 2] if lrs else None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for arm in suite.arms:
        key = next((r["run"] for r in results if r["arm"] == arm and r["seed_index"] == 0 and r["lr"] == mid), None)
        if key is None:
            continue
        path = os.path.join(out, "runs", key, "metrics.jsonl")
        series = read_series(path) if os.path.isfile(path) else {"lm_loss": [], "grad_norm": []}
        loss, grad = series["lm_loss"], series["grad_norm"]
        axes[0].plot(loss, label=arm, lw=1)
        axes[1].plot(grad, label=arm, lw=1)
    axes[0].set(xlabel="step", ylabel="train LM loss", title=f"training loss (seed 0{', lr %g' % mid if mid else ''})")
    axes[1].set(xlabel="step", ylabel="gradient norm", yscale="log", title="gradient norm (before clipping)")
    axes[0].legend(fontsize=7)
    _save(fig, out, "curves.png", files)

    fig, ax = plt.subplots(figsize=(7, 4))
    if len(lrs) > 1:
        for arm in suite.arms:
            pts = sorted((r["lr"], r["heldout_loss"]) for r in results if r["arm"] == arm)
            by = {}
            for lr, v in pts:
                by.setdefault(lr, []).append(v)
            xs = sorted(by)
            ax.errorbar(xs, [np.nanmean(by[x]) for x in xs], yerr=[np.nanstd(by[x]) for x in xs], label=arm,
                        marker="o", capsize=2)
        ax.set(xscale="log", xlabel="peak learning rate", ylabel="held-out loss", title="learning-rate sensitivity")
        ax.legend(fontsize=7)
    else:
        names = list(suite.arms)
        vals = [[r["heldout_loss"] for r in results if r["arm"] == a] for a in names]
        ax.bar(range(len(names)), [np.nanmean(v) for v in vals], yerr=[np.nanstd(v) for v in vals], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        lo = np.nanmin([np.nanmin(v) for v in vals if v])
        ax.set_ylim(lo - 0.1, None)
        ax.set(ylabel="held-out loss (mean ± std over seeds)", title="held-out loss per arm")
    _save(fig, out, "heldout_loss.png", files)

    with_gamma = [r for r in results if r.get("gamma") and r["seed_index"] == 0 and r["lr"] == mid]
    if with_gamma:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for r in with_gamma:
            post = r["gamma"][-1].get("post_mlp_layernorm")
            if post:
                axes[0].plot([g[0] for g in post], label=f"{r['arm']} end", marker=".")
                axes[0].plot([g[0] for g in r["gamma"][0]["post_mlp_layernorm"]], ls=":", color="grey", lw=0.8)
            line, = axes[1].plot(r["act_rms_end"], label=r["arm"], marker=".")
            axes[1].plot(r["act_rms_init"], ls=":", color=line.get_color(), lw=0.8)
        axes[0].set(xlabel="layer", ylabel="post-MLP norm gamma, mean", title="gamma by depth (dotted: init)")
        axes[1].set(xlabel="residual stream after layer", ylabel="RMS", yscale="log",
                    title="activation RMS by depth (dotted: init)")
        for ax in axes:
            ax.legend(fontsize=7)
        _save(fig, out, "depth.png", files)

    with_domains = [r for r in results if r.get("domain_counts") and r["seed_index"] == 0]
    if with_domains:
        n = len(with_domains)
        fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), squeeze=False)
        for ax, r in zip(axes[0], with_domains):
            c = np.asarray(r["domain_counts"])[0]
            ax.imshow(c / np.maximum(c.sum(-1, keepdims=True), 1), aspect="auto", cmap="viridis", vmin=0)
            ax.set_yticks(range(len(r["domains"])), r["domains"], fontsize=7)
            ax.set(xlabel="expert", title=f"{r['arm']}\nKL {r['kl_specialisation']:.3f}")
            ax.title.set_fontsize(8)
        fig.suptitle("expert share per domain, first MoE layer, held-out data", fontsize=9)
        _save(fig, out, "specialisation.png", files)

    with_drop = [r for r in results if r.get("drop_rate_per_layer") and r["seed_index"] == 0]
    if with_drop:
        fig, ax = plt.subplots(figsize=(7, 4))
        for r in with_drop:
            ax.plot(r["drop_rate_per_layer"], marker="o", label=r["arm"])
        ax.set(xlabel="MoE layer", ylabel="drop rate (share of routed pairs)", title="tokens dropped per layer")
        ax.legend(fontsize=7)
        _save(fig, out, "drop_rate.png", files)

    with_is = [r for r in results if r.get("imbalance_by_batch") and r["seed_index"] == 0]
    if with_is:
        from ..metrics import imbalance_monte_carlo

        sizes = sorted({int(k) for r in with_is for k in r["imbalance_by_batch"]})
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        e, k, devices, _ = with_is[0]["routing_shape"]
        random_is = imbalance_monte_carlo(20000, 16, e, k, devices, moge=False, seed=0)
        top = max(random_is.max(), max(max(r["imbalance_by_batch"].get("16", [0])) for r in with_is))
        bins = np.arange(-1 / 32, top + 1 / 16, 1 / 16)
        axes[0].hist(random_is, bins=bins, weights=np.full(random_is.size, 1 / random_is.size), alpha=0.5,
                     color="grey", label=f"random top-{k} (mean {random_is.mean():.3f})")
        for r in with_is:
            v = np.asarray(r["imbalance_by_batch"].get("16", []))
            if len(v):
                axes[0].hist(v, bins=bins, weights=np.full(v.size, 1 / v.size), alpha=0.5,
                             label=f"{r['arm']} trained (mean {v.mean():.3f})")
        paper = imbalance_monte_carlo(20000, 16, 64, 8, 8, moge=False, seed=0).mean()
        axes[0].plot([], [], " ", label=f"paper's shape (N=64, K=8, M=8), random: mean {paper:.3f} (paper 0.669)")
        axes[0].set(xlabel="imbalance score, batches of 16 tokens", ylabel="share of batches",
                    title=f"IS histogram ({e} experts, top-{k}, {devices} devices)")
        for r in with_is:
            axes[1].plot(sizes, [np.mean(r["imbalance_by_batch"][str(s)]) for s in sizes], marker="o", label=r["arm"])
        axes[1].axhline(random_is.mean(), ls=":", color="grey", label="random top-k (16 tokens)")
        axes[1].set(xscale="log", xlabel="tokens per batch", ylabel="mean imbalance score",
                    title="device imbalance of trained routers (held-out data)")
        for ax in axes:
            ax.legend(fontsize=7)
        _save(fig, out, "imbalance.png", files)
    return files


def write_report(suite: Suite, results: Sequence[Dict], out: str, command: str, wall_s: Optional[float]) -> str:
    """results.csv, arms.csv, the plots and report.md into ``out``; returns the report's path."""
    cols, rows = results_table(results)
    _write_csv(os.path.join(out, "results.csv"), cols, rows)
    arms = arm_table(suite, results)
    arm_cols = sorted({k for a in arms for k in a}, key=lambda k: (k not in ("arm", "seed_index"), k))
    _write_csv(os.path.join(out, "arms.csv"), arm_cols, [{c: a.get(c, "") for c in arm_cols} for a in arms])
    files = plots(suite, results, arms, out)
    claims = evaluate_claims(suite, results, arms)
    lines = [f"# Ablation suite `{suite.name}` ({suite.scale} scale)", "", suite.title, "",
             f"- command: `{command}`",
             f"- runs: {len(results)} ({len(suite.arms)} arms x {max(1, len(suite.learning_rates))} learning rates "
             f"x {suite.seeds} seeds); seeds are the base recipe's seed + 0..{suite.seeds - 1}",
             f"- base recipe: `{os.path.relpath(suite.base)}`; data: `{os.path.relpath(suite.data)}`",
             f"- common overrides: `{json.dumps(suite.overrides)}`"]
    spent = _invocations(out)
    if spent:
        lines.append(f"- suite time: {sum(i['seconds'] for i in spent) / 60:.1f} min of wall time over "
                     f"{len(spent)} invocation(s) that ran runs (" + "; ".join(
                         f"{i['finished']}: {i['runs_run']} runs in {i['seconds'] / 60:.1f} min, --jobs {i['jobs']}"
                         for i in spent) + ")")
    elif wall_s is not None:
        lines.append(f"- wall time of this invocation: {wall_s / 60:.1f} min")
    run_s = [r["run_wall_s"] for r in results if _scalar(r.get("run_wall_s"))]
    if run_s:
        lines.append(f"- run processes: {sum(run_s) / 60:.1f} min in total, {np.mean(run_s):.0f} s per run on "
                     "average (each run on one runtime thread; `--jobs` runs at a time)")
    if suite.notes:
        lines += ["", suite.notes.strip()]
    lines += ["", "## Claims", "",
              "| id | source | paper | metric | ours (mean ± std) | effect | n | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in claims:
        cl: Claim = c["claim"]
        lines.append(f"| {cl.id} | {cl.source} | {cl.paper} | `{cl.metric}` ({cl.expect}) | {c['ours']} | "
                     f"{c['effect']} | {c['n']} | **{c['verdict']}**: {c['why']} |")
    lines += ["", "Verdict rule: the effect (treatment minus baseline, paired by learning rate and seed) agrees or "
              "disagrees when a two-sided t-test at 5 % puts its mean away from 0 (|mean| >= t(0.975, n-1) x standard "
              "error); otherwise inconclusive. Pairs with a non-finite value (a diverged run) are left out.", "",
              "## Arms", "", "| arm | " + " | ".join(_summary_metrics(rows)) + " |",
              "|---|" + "---|" * len(_summary_metrics(rows))]
    for arm in suite.arms:
        rs = [r for r in rows if r["arm"] == arm]
        lines.append(f"| {arm} | " + " | ".join(_ms([float(r[m]) for r in rs if r[m] != ""])
                                                 for m in _summary_metrics(rows)) + " |")
    if arms and any("lr_sensitivity" in a for a in arms):
        lines += ["", "Learning-rate sensitivity (arms.csv): mean over the grid of min(held-out loss, loss at init) "
                  "minus the grid's best held-out loss (Wortsman et al. 2023).", "",
                  "| arm | lr_sensitivity | divergences | best lr |", "|---|---|---|---|"]
        for arm in suite.arms:
            a = [x for x in arms if x["arm"] == arm]
            lines.append(f"| {arm} | {_ms([x['lr_sensitivity'] for x in a])} | "
                         f"{sum(x['divergences'] for x in a)} | {', '.join('%g' % x['best_lr'] for x in a)} |")
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files]
    lines += ["", "Files: `results.csv` (one row per run; timing columns: " + ", ".join(TIMING_COLUMNS) +
              "), `arms.csv`, `runs/<run>/metrics.jsonl` (every step), `runs/<run>/result.json`."]
    path = os.path.join(out, "report.md")
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def _invocations(out: str) -> List[Dict]:
    """The invocations (runner.INVOCATIONS) that ran at least one run."""
    path = os.path.join(out, "invocations.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [i for i in map(json.loads, fh) if i.get("runs_run")]


_PREFERRED = ("heldout_loss", "final_train_loss", "loss_spike_score", "grad_spike_score", "diverged", "max_vio_batch",
              "max_vio_global", "imbalance_score_ep", "expert_cv", "kl_specialisation", "drop_rate",
              "mtp_acceptance_rate", "mtp_mean_accepted_length")


def _summary_metrics(rows: Sequence[Dict]) -> List[str]:
    return [m for m in _PREFERRED if rows and m in rows[0] and any(r[m] != "" for r in rows)]


def publish(suite: Suite, out: str, docs_dir: str) -> str:
    """Copy a finished suite's report into ``docs_dir``: ``<suite>.md`` (image links pointing into ``<suite>/``),
    and ``<suite>/`` with the plots, results.csv and arms.csv. Returns the page's path."""
    import shutil

    target = os.path.join(docs_dir, suite.name)
    os.makedirs(target, exist_ok=True)
    names = [f for f in os.listdir(out) if f.endswith((".png", ".csv"))]
    for f in names:
        shutil.copyfile(os.path.join(out, f), os.path.join(target, f))
    with open(os.path.join(out, "report.md"), encoding="utf-8") as fh:
        text = fh.read()
    for f in names:
        text = text.replace(f"]({f})", f"]({suite.name}/{f})")
    page = os.path.join(docs_dir, f"{suite.name}.md")
    write_text_atomic(page, text)
    return page
