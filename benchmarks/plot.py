"""Figures from benchmark results files (matplotlib, Agg backend: no display needed).

Each results file becomes PNGs beside it (or in ``--out-dir``), named after it:

* comparisons (digits.py, mnist.py, cifar10_resnet18.py): ``*_curves.png`` (loss and accuracy per
  epoch), ``*_hyper.png`` (lr and weight decay trajectories of every method; one line per group),
  ``*_final.png`` (final test loss per method);
* search.py: ``*_time_to_target.png`` (runs and wall-clock each search needs to reach the target,
  OHO's single run beside them), ``*_incumbent.png`` (incumbent test loss against wall-clock);
* robustness.py: ``*_grid.png`` (distribution of final test loss over the initial-hyperparameter grid,
  and the grid itself), ``*_reset.png`` (trajectories after a sudden reset).

    python benchmarks/plot.py benchmarks/results/digits
    python benchmarks/plot.py benchmarks/results/digits/compare_mlp.json --out-dir /tmp/figures
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

import common  # noqa: E402

HYPER_LABELS = {"lr": "learning rate", "weight_decay": "weight decay", "momentum": "momentum"}


@dataclass
class PlotConfig:
    inputs: Tuple[str, ...] = ()  # results files or directories (searched recursively); bare arguments too
    out_dir: str = ""  # default: beside each results file
    dpi: int = 120


def _colors(names: Sequence[str]) -> Dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {name: cmap(i % 10) for i, name in enumerate(names)}


def _series(values: Sequence[Any]) -> np.ndarray:
    """A list with None (diverged / missing) as NaN, so matplotlib leaves a gap."""
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _scale_y(ax: Any, values: Sequence[Any]) -> None:
    """Log scale when the finite positive values span more than a factor of 10, linear otherwise."""
    finite = [v for v in values if v is not None and np.isfinite(v) and v > 0]
    if finite and max(finite) > 10 * min(finite):
        ax.set_yscale("log")


def _norm(values: Sequence[float]) -> Any:
    low, high = min(values), max(values)
    if low > 0 and high > 10 * low:
        return matplotlib.colors.LogNorm(vmin=low, vmax=high)
    return matplotlib.colors.Normalize(vmin=low, vmax=high)


def _save(fig: Any, path: Path, dpi: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _title(payload: Dict[str, Any], what: str) -> str:
    task_cfg = payload["config"].get("task", {})
    model = task_cfg.get("model", "")
    synthetic = " (synthetic data)" if payload.get("synthetic") else ""
    return f"{payload['task']} / {model}{synthetic}: {what}"


# --------------------------------------------------------------------------------------------- compare
def _first_seed(payload: Dict[str, Any]) -> Dict[str, Any]:
    """method -> the run of the first seed (the curves drawn; the summary covers every seed)."""
    return {name: runs[0] for name, runs in payload["methods"].items()}


def plot_curves(payload: Dict[str, Any], stem: Path, dpi: int) -> List[Path]:
    methods = _first_seed(payload)
    colors = _colors(list(methods))
    panels = [("test_loss", "test loss"), ("test_acc", "test accuracy"), ("val_loss", "validation loss"),
              ("train_loss", "training loss")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (key, label) in zip(axes.flat, panels):
        shown: List[Any] = []
        for name, result in methods.items():
            curves = result["curves"]
            if key in curves:
                ax.plot(curves["epoch"], _series(curves[key]), color=colors[name], label=name, lw=1.4)
                shown += curves[key]
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if "loss" in key:
            _scale_y(ax, shown)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(_title(payload, "learning curves"))
    return [_save(fig, stem.with_name(stem.name + "_curves.png"), dpi)]


def _hyper_names(results: Dict[str, Any]) -> List[str]:
    present = {n for r in results.values() for n in common.HYPER_NAMES if r["trace"].get(n)}
    return [n for n in common.HYPER_NAMES if n in present]


def _plot_trajectories(ax: Any, result: Dict[str, Any], name: str, color: Any, label: str) -> None:
    """One line per param group (the per-step trace), the label once."""
    trace = result["trace"]
    epochs = np.array(trace["epoch"], dtype=float)
    values = np.array([[np.nan if v is None else v for v in row] for row in trace[name]], dtype=float)
    width = 1.6 if values.shape[1] == 1 else 0.7
    for g in range(values.shape[1]):
        ax.plot(epochs, values[:, g], color=color, lw=width, alpha=0.9 if g == 0 else 0.5,
                label=label if g == 0 else None)


def plot_hyper(payload: Dict[str, Any], stem: Path, dpi: int) -> List[Path]:
    methods = _first_seed(payload)
    names = _hyper_names(methods)
    def varies(name: str) -> bool:
        return any(len({tuple(row) for row in r["trace"].get(name, [])}) > 1 for r in methods.values())

    names = [n for n in names if varies(n)] or names[:1]
    colors = _colors(list(methods))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, result in methods.items():
            if result["trace"].get(name):
                groups = len(result["groups"])
                label = method if groups == 1 else f"{method} ({groups} groups)"
                _plot_trajectories(ax, result, name, colors[method], label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(HYPER_LABELS[name])
        if name != "momentum":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(_title(payload, "hyperparameter trajectories"))
    return [_save(fig, stem.with_name(stem.name + "_hyper.png"), dpi)]


def plot_final(payload: Dict[str, Any], stem: Path, dpi: int) -> List[Path]:
    """Final test loss per method: the mean over seeds (bar), its standard deviation, every seed (dots)."""
    rows = payload["summary"]
    names = [r["method"] for r in rows]
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    for i, row in enumerate(rows):
        mean = row["test_loss"] or 0.0
        ax.bar(i, mean, color=colors[row["method"]], yerr=row.get("test_loss_std"), capsize=3)
        seeds = [v for v in row.get("per_seed_test_loss", []) if v is not None]
        if len(seeds) > 1:
            ax.scatter([i] * len(seeds), seeds, color="black", s=8, zorder=3)
        text = f"{row['test_loss']:.3f}\n{100 * row['test_acc']:.1f}%" if row["test_loss"] is not None else ""
        if row.get("diverged"):
            text += f"\n{row['diverged']}/{row.get('seeds', 1)} diverged"
        ax.annotate(text.strip(), (i, max([mean] + seeds)), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final test loss")
    ax.margins(y=0.25)
    ax.set_ylim(bottom=0.0)
    ax.grid(axis="y", alpha=0.3)
    seeds = rows[0].get("seeds", 1) if rows else 1
    what = "final test loss (accuracy)" + (f", mean over {seeds} seeds" if seeds > 1 else "")
    ax.set_title(_title(payload, what), fontsize=10)
    return [_save(fig, stem.with_name(stem.name + "_final.png"), dpi)]


# ---------------------------------------------------------------------------------------------- search
def plot_time_to_target(payload: Dict[str, Any], stem: Path, dpi: int) -> List[Path]:
    """Bars of runs and wall-clock to target; a search that never reached it shows its whole budget,
    hatched and marked '>'."""
    rows = payload["summary"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.1 * len(rows) + 4), 4.5))
    budgets = {"runs_to_target": lambda r: _trials_per_search(payload), "wall_to_target_s": lambda r: r["total_wall_s"]}
    for ax, key, label in ((axes[0], "runs_to_target", "training runs to reach target"),
                           (axes[1], "wall_to_target_s", "training wall-clock to reach target [s]")):
        for i, row in enumerate(rows):
            reached = row[key] is not None
            height = row[key] if reached else budgets[key](row)
            oho = row["method"].startswith("oho")
            ax.bar(i, height or 0.0, color="tab:red" if oho else "tab:blue", alpha=1.0 if reached else 0.35,
                   hatch=None if reached else "//", edgecolor="black", lw=0.5)
            text = f"{height:.3g}" if reached else f">{height:.3g}"
            ax.annotate(text, (i, height or 0.0), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    heights = [r["wall_to_target_s"] or r["total_wall_s"] for r in rows]
    heights = [h for h in heights if h]
    if heights and max(heights) > 10 * min(heights):
        axes[1].set_yscale("log")
        axes[1].set_ylim(bottom=min(heights) / 3)
    fig.suptitle(_title(payload, f"time to test loss {payload['target']:.4f} (red: OHO, one run)"))
    return [_save(fig, stem.with_name(stem.name + "_time_to_target.png"), dpi)]


def _trials_per_search(payload: Dict[str, Any]) -> int:
    return int(payload["config"]["search"]["trials"])


def plot_incumbent(payload: Dict[str, Any], stem: Path, dpi: int) -> List[Path]:
    searches = [r for r in payload["summary"] if "searches" in r]
    colors = _colors([r["method"] for r in searches])
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in searches:
        for k, search in enumerate(row["searches"]):
            ax.step(search["cumulative_wall_s"], _series(search["incumbent_test_loss"]), where="post",
                    color=colors[row["method"]], alpha=0.9 if k == 0 else 0.4, label=row["method"] if k == 0 else None)
    for (name, result), marker in zip(payload.get("oho", {}).items(), "*PXD^v"):
        final = result["final"]
        if final.get("test_loss") is not None:
            ax.scatter([final["wall_time_s"]], [final["test_loss"]], marker=marker, s=110, color="tab:red", zorder=5,
                       edgecolor="black", lw=0.5, label=f"{name} (one run)")
    ax.axhline(payload["target"], color="black", ls="--", lw=0.8, label="target")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cumulative training wall-clock [s]")
    ax.set_ylabel("incumbent test loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(_title(payload, "search progress"), fontsize=10)
    return [_save(fig, stem.with_name(stem.name + "_incumbent.png"), dpi)]


# ------------------------------------------------------------------------------------------ robustness
def plot_grid(payload: Dict[str, Any], stem: Path, dpi: int) -> List[Path]:
    """Box plots of final test loss per method over the grid, and one lr x weight-decay map per method."""
    grid = payload["grid"]
    cfg = payload["config"]["robustness"]
    methods = [row["method"] for row in grid["summary"]]
    lrs, wds = cfg["grid_lrs"], cfg["grid_wds"]
    finite = [r["final"]["test_loss"] for r in grid["runs"] if r["final"].get("test_loss") is not None]
    ceiling = max(finite) if finite else 1.0
    fig, axes = plt.subplots(1, 1 + len(methods), figsize=(4.5 * (1 + len(methods)), 4), squeeze=False)
    box_ax = axes[0][0]
    data = []
    for method in methods:
        losses = [r["final"].get("test_loss") for r in grid["runs"] if r["method"] == method]
        data.append([ceiling if v is None else v for v in losses])
    box_ax.boxplot(data, whis=(0, 100))
    box_ax.set_xticks(range(1, len(methods) + 1))
    box_ax.set_xticklabels(methods, fontsize=8)
    for i, row in enumerate(grid["summary"], 1):
        if row["diverged"]:
            box_ax.annotate(f"{row['diverged']} diverged\n(drawn at max)", (i, ceiling), ha="center",
                            va="bottom", fontsize=7)
    _scale_y(box_ax, [v for row in data for v in row])
    box_ax.set_ylabel("final test loss")
    box_ax.set_title("over the grid (whiskers: min-max)", fontsize=9)
    box_ax.grid(axis="y", alpha=0.3)
    norm = _norm([v for row in data for v in row])
    for ax, method in zip(axes[0][1:], methods):
        table = np.full((len(lrs), len(wds)), np.nan)
        for r in grid["runs"]:
            if r["method"] == method:
                table[lrs.index(r["lr"]), wds.index(r["weight_decay"])] = _series([r["final"].get("test_loss")])[0]
        image = ax.imshow(table, origin="lower", cmap="viridis_r", aspect="auto", norm=norm)
        for (i, j), value in np.ndenumerate(table):
            light = not math.isnan(value) and norm(value) < 0.5  # viridis_r is light at low values
            ax.text(j, i, "div." if math.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if light else "white")
        ax.set_xticks(range(len(wds)))
        ax.set_xticklabels([f"{w:g}" for w in wds], fontsize=7)
        ax.set_yticks(range(len(lrs)))
        ax.set_yticklabels([f"{v:g}" for v in lrs], fontsize=7)
        ax.set_xlabel("initial weight decay")
        ax.set_ylabel("initial lr")
        ax.set_title(method, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(_title(payload, "final test loss over initial hyperparameters"))
    return [_save(fig, stem.with_name(stem.name + "_grid.png"), dpi)]


def plot_reset(payload: Dict[str, Any], stem: Path, dpi: int) -> List[Path]:
    """Per method: lr, weight decay and test loss over epochs for each reset, the reset marked."""
    reset = payload["reset"]
    methods = list(dict.fromkeys(r["method"] for r in reset["runs"]))
    labels = list(dict.fromkeys(r["reset"] for r in reset["runs"]))
    colors = _colors(labels)
    panels = ["lr", "weight_decay", "test_loss"]
    fig, axes = plt.subplots(len(methods), 3, figsize=(14, 3.6 * len(methods)), squeeze=False)
    for row, method in zip(axes, methods):
        for run in (r for r in reset["runs"] if r["method"] == method):
            for ax, key in zip(row, panels):
                if key == "test_loss":
                    ax.plot(run["curves"]["epoch"], _series(run["curves"][key]), color=colors[run["reset"]],
                            label=run["reset"])
                elif run["trace"].get(key):
                    _plot_trajectories(ax, run, key, colors[run["reset"]], run["reset"])
        for ax, key in zip(row, panels):
            _scale_y(ax, [y for line in ax.get_lines() for y in line.get_ydata()])
            ax.axvline(reset["reset_epoch"] - 1, color="black", ls=":", lw=0.8)
            ax.set_xlabel("epoch")
            ax.set_ylabel(HYPER_LABELS.get(key, "test loss"))
            ax.set_title(method, fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle(_title(payload, "response to a reset (dotted line)"))
    return [_save(fig, stem.with_name(stem.name + "_reset.png"), dpi)]


PLOTTERS: Dict[str, List[Tuple[str, Callable[..., List[Path]]]]] = {
    "compare": [("methods", plot_curves), ("methods", plot_hyper), ("summary", plot_final)],
    "search": [("summary", plot_time_to_target), ("summary", plot_incumbent)],
    "robustness": [("grid", plot_grid), ("reset", plot_reset)],
}


def plot_file(path: Path, out_dir: Optional[Path] = None, dpi: int = 120) -> List[Path]:
    """Every figure for one results file; returns the PNG paths."""
    payload = json.loads(path.read_text())
    stem = (out_dir or path.parent) / path.stem
    written: List[Path] = []
    for needs, plotter in PLOTTERS.get(payload.get("kind"), []):
        if payload.get(needs):
            written += plotter(payload, stem, dpi)
    return written


def result_files(inputs: Sequence[str]) -> List[Path]:
    files: List[Path] = []
    for item in inputs:
        path = Path(item)
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    return files


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    cfg = common.parse_config(argv, PlotConfig, positional="inputs")
    inputs = cfg.inputs or (str(common.RESULTS_DIR),)
    written: List[Path] = []
    for path in result_files(inputs):
        figures = plot_file(path, Path(cfg.out_dir) if cfg.out_dir else None, cfg.dpi)
        for figure in figures:
            print(figure)
        written += figures
    if not written:
        print(f"no results files with figures under {', '.join(inputs)}")
    return written


if __name__ == "__main__":
    main()
