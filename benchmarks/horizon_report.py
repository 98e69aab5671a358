"""Tables and lr-trajectory figure from ``horizon_study.py`` results files (runs.jsonl).

    python benchmarks/horizon_report.py benchmarks/results/horizon/runs.jsonl
    python benchmarks/horizon_report.py MAIN/runs.jsonl FOLLOWUP/runs.jsonl   # follow-up runs, judged
                                                                              # against MAIN's grids

Writes ``summary.json``, ``summary.md`` and ``lr_trajectories.png`` beside the LAST file given. Wall
time ratios compare runs with the plain runs of their own file (other machines are not comparable):
"-" where that file has none.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
from typing import Any, Dict, List


def _load(path: str):
    header, runs = None, []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "header":
                header = rec
            else:
                runs.append(rec)
    return header, runs


def _loss(r: Dict[str, Any]) -> float:
    """Final test loss; a diverged run (non-finite) counts as chance."""
    v = r.get("test_loss")
    return v if v is not None and math.isfinite(v) else r["chance_loss"]


def _ms(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarise(path: str, *extra: str) -> Dict[str, Any]:
    header, runs = _load(path)
    for i, other in enumerate(extra):
        for r in _load(other)[1]:
            r["source"] = i + 1
            runs.append(r)
    path = extra[-1] if extra else path
    errors = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    tasks = sorted({r["task"] for r in runs})
    out: Dict[str, Any] = {"source": os.path.basename(path), "environment": header and header["environment"],
                           "errors": [{k: e.get(k) for k in ("task_name", "method", "lr0", "seed", "error")}
                                      for e in errors], "tasks": {}}
    lines = [f"Results file: {os.path.basename(path)}; machine: "
             f"{(header or {}).get('environment', {}).get('cpu')} "
             f"({(header or {}).get('environment', {}).get('cpu_count')} cores, one thread per run)", ""]
    for task in tasks:
        mine = [r for r in runs if r["task"] == task]
        grid: Dict[str, Dict[float, List[float]]] = {}
        plain_walls: Dict[int, List[float]] = {}
        for r in mine:
            if r["method"] == "fixed":
                plain_walls.setdefault(r.get("source", 0), []).append(r["wall_s"])
            if r["method"] in ("fixed", "cosine"):
                grid.setdefault(r["method"], {}).setdefault(r["lr0"], []).append(_loss(r))
        best = {k: min((statistics.mean(v), lr) for lr, v in d.items()) for k, d in grid.items()}
        target = min(b[0] for b in best.values()) if best else None
        plain = {k: statistics.median(v) for k, v in plain_walls.items()}
        plain_wall = plain.get(0)
        t_out: Dict[str, Any] = {"grids": {k: {str(lr): v for lr, v in d.items()} for k, d in grid.items()},
                                 "best": {k: {"test_loss": b[0], "lr": b[1]} for k, b in best.items()},
                                 "plain_wall_s": plain_wall, "candidates": {}}
        lines += [f"### {task}", ""]
        for kind, d in grid.items():
            cells = " / ".join(f"{statistics.mean(v):.4f}" for lr, v in sorted(d.items()))
            lines.append(f"- {kind} grid lr {' / '.join(f'{lr:g}' for lr in sorted(d))}: {cells}"
                         f" (best {best[kind][0]:.4f} at {best[kind][1]:g})")
        lines += ["", "| candidate | lr0=1e-3 | lr0=1e-2 | lr0=1e-1 | median (9 runs) | / best grid | diverged | "
                  "final lr (min-max) | wall / plain |", "|---|---|---|---|---|---|---|---|---|"]
        for method in [m for m in dict.fromkeys(r["method"] for r in mine) if m not in ("fixed", "cosine")]:
            rs = [r for r in mine if r["method"] == method]
            by_lr = {lr: [_loss(r) for r in rs if r["lr0"] == lr] for lr in sorted({r["lr0"] for r in rs})}
            losses = [_loss(r) for r in rs]
            median = statistics.median(losses)
            lrs = [r["final_lr"] for r in rs if r["final_lr"] is not None and math.isfinite(r["final_lr"])]
            div = sum(bool(r["diverged"]) for r in rs)
            source = rs[0].get("source", 0)
            wall = statistics.median(r["wall_s"] for r in rs) / plain[source] if source in plain else None
            ratio = median / target if target else None
            t_out["candidates"][method] = {
                "by_lr0": {str(k): v for k, v in by_lr.items()}, "median": median, "ratio_to_best_grid": ratio,
                "diverged": div, "runs": len(rs), "final_lr_min": min(lrs) if lrs else None,
                "final_lr_max": max(lrs) if lrs else None, "wall_over_plain": wall,
                "final_weight_decay": [r["final_weight_decay"] for r in rs]}
            cells = " | ".join(_ms(by_lr.get(lr, [])) for lr in (1e-3, 1e-2, 1e-1))
            ratio_text = f"{ratio:.2f}x" if ratio is not None else "-"
            wall_text = f"{wall:.2f}x" if wall is not None else "-"
            lines.append(f"| {method} | {cells} | {median:.4f} | {ratio_text} | {div}/{len(rs)} | "
                         f"{min(lrs) if lrs else float('nan'):.3g}-{max(lrs) if lrs else float('nan'):.3g} | "
                         f"{wall_text} |")
        lines.append("")
        out["tasks"][task] = t_out
    base = os.path.dirname(path)
    with open(os.path.join(base, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(base, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _figure(runs, tasks, os.path.join(base, "lr_trajectories.png"))
    return out


def _figure(runs, tasks, path: str, methods=None) -> None:
    """One panel per (task, candidate), 5 columns; lr (solid) and weight decay (dotted, right axis
    omitted: same log scale) per run; y clipped to [1e-6, 10] so a collapse to ~0 shows as the floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = methods or [m for m in dict.fromkeys(r["method"] for r in runs) if m not in ("fixed", "cosine")]
    cols = 5
    rows_per_task = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows_per_task * len(tasks), cols, figsize=(3.0 * cols, 2.1 * rows_per_task * len(tasks)),
                             squeeze=False)
    colours = {1e-3: "tab:blue", 1e-2: "tab:orange", 1e-1: "tab:green"}
    for i, task in enumerate(tasks):
        for j in range(rows_per_task * cols):
            ax = axes[i * rows_per_task + j // cols][j % cols]
            if j >= len(methods):
                ax.axis("off")
                continue
            method = methods[j]
            for r in runs:
                if r["task"] == task and r["method"] == method:
                    c = r["curve"]
                    colour = colours.get(r["lr0"], "k")
                    ax.plot(c["step"], [max(v, 1e-6) for v in c["lr"]], color=colour, lw=0.8,
                            ls="--" if r["diverged"] else "-")
                    ax.plot(c["step"], [max(v, 1e-6) for v in c["weight_decay"]], color=colour, lw=0.6, ls=":")
            ax.set_yscale("log")
            ax.set_ylim(1e-6, 10)
            ax.set_title(f"{task}: {method}", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.suptitle("lr (solid; dashed: run diverged or ended at chance) and weight decay (dotted); "
                 "colour: lr0 1e-3 / 1e-2 / 1e-1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    summarise(*sys.argv[1:])
