"""Figures of a suite results file (benchmarks/suite.py).

Per task, two figures next to the results file (or in ``--out-dir``):

* ``<stem>_<task>_hyper.png``: the lr (top row) and weight decay (bottom row) trajectories of every
  OHO method, one line per run, coloured by initial lr; dashed lines mark the lr of the best fixed grid
  point and the initial lr of the best cosine grid point.
* ``<stem>_<task>_grid.png``: mean final test loss against lr for the fixed and cosine grids (and the
  AdamW grids), with OHO's per-initial-lr means at their initial lr and the tuning-free methods
  (schedule-free, Prodigy) as horizontal lines.

    python benchmarks/suite_plot.py benchmarks/results/suite/suite.json [--out-dir DIR] [--oho oho,oho_x]

``--oho`` keeps only these OHO methods (a merged file may hold many variants); grids and baselines stay.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _finite(values: Sequence[Optional[float]]) -> List[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def hyper_figure(task: str, runs: List[Dict[str, Any]], entry: Dict[str, Any], path: Path) -> Optional[Path]:
    methods = list(dict.fromkeys(r["method"] for r in runs if r["method"].startswith("oho") and r.get("trace")))
    if not methods:
        return None
    lr0s = sorted({r["lr"] for r in runs if r["method"] in methods})
    colours = {lr: plt.cm.viridis(k / max(len(lr0s) - 1, 1)) for k, lr in enumerate(lr0s)}
    fig, axes = plt.subplots(2, len(methods), figsize=(3.6 * len(methods), 5.6), squeeze=False, sharex=True)
    for col, method in enumerate(methods):
        top, bottom = axes[0][col], axes[1][col]
        labelled = set()
        for run in (r for r in runs if r["method"] == method and r.get("trace")):
            trace = run["trace"]
            label = f"lr0 {run['lr']:g}" if run["lr"] not in labelled else None
            labelled.add(run["lr"])
            style = dict(color=colours[run["lr"]], lw=1.0, alpha=0.8, label=label,
                         ls=":" if run.get("diverged") else "-")
            top.plot(trace["step"], [v if v else math.nan for v in trace["lr"]], **style)
            bottom.plot(trace["step"], [v if v else math.nan for v in trace["weight_decay"]], **style)
        for key, ls in (("best_fixed", "--"), ("best_cosine", "-.")):
            if key in entry:
                top.axhline(entry[key]["lr"], color="grey", ls=ls, lw=0.8,
                            label=f"{key.replace('_', ' ')} lr {entry[key]['lr']:g}" if col == 0 else None)
        top.set_yscale("log")
        bottom.set_yscale("log")
        top.set_title(method)
        bottom.set_xlabel("step")
        if col == 0:
            top.set_ylabel("lr")
            bottom.set_ylabel("weight decay")
            top.legend(fontsize=7)
    fig.suptitle(f"{task}: OHO hyperparameter trajectories (dotted: diverged)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grid_figure(task: str, runs: List[Dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        lrs = sorted({r["lr"] for r in mine if r["lr"] is not None})
        if not lrs:  # a tuning-free method: a horizontal line at its mean
            losses = _finite([r.get("test_loss") for r in mine])
            if losses:
                ax.axhline(statistics.fmean(losses), ls=":", lw=1.2, label=method,
                           color="tab:red" if "prodigy" in method else "tab:purple" if "sgd" in method else "tab:brown")
            continue
        means = []
        for lr in lrs:
            losses = [r.get("test_loss") for r in mine if r["lr"] == lr]
            means.append(statistics.fmean(losses) if losses and all(v is not None for v in losses) else math.nan)
        marker = "s" if method.startswith("oho") else "o"
        ax.plot(lrs, means, marker=marker, ms=4, lw=1.0 if method.startswith("oho") else 1.6,
                ls="--" if method.startswith("oho") else "-", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("lr (grids) / initial lr (OHO)")
    ax.set_ylabel("final test loss (mean over seeds)")
    ax.set_title(f"{task}: the sweep against one OHO run (missing points: a seed failed)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    parser = argparse.ArgumentParser(description="figures of a suite results file")
    parser.add_argument("results")
    parser.add_argument("--out-dir", default="")
    parser.add_argument("--oho", default="", help="comma list of the OHO methods to draw (default: all)")
    args = parser.parse_args(argv)
    keep = {m for m in args.oho.split(",") if m}
    source = Path(args.results)
    payload = json.loads(source.read_text())
    out_dir = Path(args.out_dir) if args.out_dir else source.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = payload.get("summary", {}).get("tasks", {})
    written = []
    for task in dict.fromkeys(r["task"] for r in payload["runs"]):
        runs = [r for r in payload["runs"] if r["task"] == task
                and not (keep and r["method"].startswith("oho") and r["method"] not in keep)]
        stem = f"{source.stem}_{task}"
        figure = hyper_figure(task, runs, summary.get(task, {}), out_dir / f"{stem}_hyper.png")
        if figure is not None:
            written.append(figure)
        written.append(grid_figure(task, runs, out_dir / f"{stem}_grid.png"))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
