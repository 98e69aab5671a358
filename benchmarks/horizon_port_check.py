"""Does the core's ``growth_cap`` option reproduce the horizon study's growth cap (``StableOHO``)?

The study measured its growth cap on the core of commit 3e06cb4 (a hook of ``StableOHO``, computing
``(A z + c) - (1 - gamma) A z`` on copies); the core option computes ``gamma A z + c`` in place. This
runs the study harness (``benchmarks/horizon_study.py`` of the tree given by ``--root``) for a few
short runs, recording lr and weight decay at every step, and compares two such files step by step.

    git archive 3e06cb4 | (mkdir -p /tmp/study && tar -x -C /tmp/study)
    python benchmarks/horizon_port_check.py --root /tmp/study --out benchmarks/results/horizon/port_check/trajectories_3e06cb4.json
    python benchmarks/horizon_port_check.py --root . --out benchmarks/results/horizon/port_check/trajectories_core.json
    python benchmarks/horizon_port_check.py --compare benchmarks/results/horizon/port_check/trajectories_3e06cb4.json \
        benchmarks/results/horizon/port_check/trajectories_core.json --out benchmarks/results/horizon/port_check/compare.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence


def trajectories(root: str, steps: int, lr0s: Sequence[float]) -> Dict[str, Any]:
    sys.path[:0] = [os.path.join(root, "benchmarks"), root]
    import torch
    import horizon_study as hs
    warnings.simplefilter("ignore")
    runs = {}
    for task in ("teacher", "digits"):
        for method in ("full", "full_growth_mlr01"):
            for lr0 in lr0s:
                r = hs.run_one(task, method, lr0, 0, steps=steps, points=steps)
                runs[f"{task}/{method}/{lr0}"] = {
                    "lr": r["curve"]["lr"], "weight_decay": r["curve"]["weight_decay"], "test_loss": r["test_loss"],
                    "gamma_below_1": r["study"]["gamma_applied"], "gamma_min": r["study"]["gamma_min"],
                    "influence_resets": r["counters"]["nonfinite_influence"], "wall_s": r["wall_s"]}
    return {"root": os.path.abspath(root), "steps": steps, "torch": torch.__version__,
            "python": platform.python_version(), "cpu": _cpu(), "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def _first(pairs: List[Any], rel: float) -> Optional[int]:
    return next((i for i, (a, b) in enumerate(pairs) if abs(a - b) > rel * abs(a)), None)


def compare(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """Per run: the first step where lr differs at all, and by more than 1e-6 / 1e-2 relative."""
    rows = {}
    for key, a in old["runs"].items():
        b = new["runs"][key]
        pairs = list(zip(a["lr"], b["lr"]))
        rows[key] = {"first_step_lr_differs": _first(pairs, 0.0), "first_step_lr_differs_1e-6": _first(pairs, 1e-6),
                     "first_step_lr_differs_1e-2": _first(pairs, 1e-2), "final_lr": [a["lr"][-1], b["lr"][-1]],
                     "test_loss": [a["test_loss"], b["test_loss"]],
                     "gamma_below_1": [a["gamma_below_1"], b["gamma_below_1"]],
                     "influence_resets": [a["influence_resets"], b["influence_resets"]]}
    return {"old": {k: v for k, v in old.items() if k != "runs"}, "new": {k: v for k, v in new.items() if k != "runs"},
            "runs": rows}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr0", default="0.01,0.1")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("OLD", "NEW"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.compare:
        with open(args.compare[0]) as f, open(args.compare[1]) as g:
            result = compare(json.load(f), json.load(g))
        for key, row in result["runs"].items():
            print(key, row)
    else:
        result = trajectories(args.root, args.steps, [float(x) for x in args.lr0.split(",")])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
