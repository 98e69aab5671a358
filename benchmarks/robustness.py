"""How much does OHO depend on its initial hyperparameters, and does it recover from a sudden change?

* ``grid`` (the paper's Fig. 3): every method in ``grid_methods`` trains once from every (initial lr,
  weight decay) pair of the grid; the spread of final test losses (median, quartiles, extremes,
  divergences) shows how much each method still needs its hyperparameters tuned. A fixed-lr SGD
  baseline keeps its grid point; OHO starts there and moves.
* ``reset`` (the paper's Fig. 6): training from the task's default hyperparameters, one hyperparameter
  of every group is overwritten at a fraction ``reset_at`` of training (``--resets lr=1.0,lr=0.001``);
  the trajectories show whether OHO returns to where it was going. An unperturbed run is the reference.

    python benchmarks/robustness.py --task digits --epochs 40
    python benchmarks/robustness.py --task mnist --parts grid --grid-lrs 0.01,0.1,1 --grid-wds 1e-5,1e-3
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

import common


@dataclass
class RobustnessConfig:
    task: str = "digits"  # digits | mnist | cifar10
    parts: Tuple[str, ...] = ("grid", "reset")
    grid_methods: Tuple[str, ...] = ("sgd", "oho_global")
    grid_lrs: Tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    grid_wds: Tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)
    reset_methods: Tuple[str, ...] = ("oho_global", "sgd")
    resets: Tuple[str, ...] = ("lr=0.5", "lr=0.002", "weight_decay=0.01")  # name=value
    reset_at: float = 0.5  # fraction of the epochs trained before the reset
    quick: bool = False

    PRESETS = {"quick": {"grid_lrs": (0.01, 0.1, 1.0), "grid_wds": (1e-4, 1e-2)}}

    def __post_init__(self) -> None:
        for part in self.parts:
            if part not in ("grid", "reset"):
                raise ValueError(f"Unknown part {part!r} (grid or reset)")
        for method in self.grid_methods + self.reset_methods:
            common.parse_method(method)  # ValueError for an unknown name
        if not 0.0 < self.reset_at < 1.0:
            raise ValueError(f"Invalid reset_at: {self.reset_at} (a fraction in (0, 1))")
        self.reset_pairs()  # validates the resets

    def reset_pairs(self) -> List[Tuple[str, float]]:
        pairs = []
        for item in self.resets:
            name, eq, value = item.partition("=")
            if not eq or name not in common.HYPER_NAMES:
                raise ValueError(f"Invalid reset {item!r}: expected lr=..., weight_decay=... or momentum=...")
            pairs.append((name, float(value)))
        return pairs


def spread(losses: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Median, quartiles and extremes of final test losses; a diverged run counts as +inf (worse than any)."""
    values = np.array([math.inf if v is None else v for v in losses], dtype=float)
    quantile = lambda q: float(np.quantile(values, q, method="inverted_cdf"))  # noqa: E731 (sample values)
    return {"median": quantile(0.5), "q25": quantile(0.25), "q75": quantile(0.75),
            "min": float(values.min()), "max": float(values.max()),
            "diverged": int(np.isinf(values).sum()), "runs": len(values)}


def _slim(result: Dict[str, Any]) -> Dict[str, Any]:
    """A grid run without its per-step trace (the grid has many runs; their final figures matter)."""
    return {k: v for k, v in result.items() if k != "trace"}


def run_grid(session: common.Session, bar: Any) -> Dict[str, Any]:
    cfg, task_cfg = session.cfg, session.task_cfg
    runs = []
    for method in cfg.grid_methods:
        for lr in cfg.grid_lrs:
            for wd in cfg.grid_wds:
                run_cfg = dataclasses.replace(task_cfg, methods=(method,), progress=False, lr=lr, weight_decay=wd,
                                              eval_every=task_cfg.epochs)  # only the final figures are needed
                result = common.run_method(method, session.model_fn, session.data, run_cfg)
                runs.append({"method": method, "lr": lr, "weight_decay": wd, **_slim(result)})
                bar.set_postfix_str(f"{method} lr={lr:g} wd={wd:g} test={result['final'].get('test_loss')}",
                                    refresh=False)
                bar.update()
    summary = [{"method": m, **spread([r["final"].get("test_loss") for r in runs if r["method"] == m])}
               for m in cfg.grid_methods]
    return {"runs": runs, "summary": summary}


def run_resets(session: common.Session, bar: Any) -> Dict[str, Any]:
    cfg, task_cfg = session.cfg, session.task_cfg
    epoch = int(task_cfg.epochs * cfg.reset_at) + 1
    runs = []
    for method in cfg.reset_methods:
        for name, value in [(None, None)] + cfg.reset_pairs():
            changes = dict(reset_epoch=epoch, reset_name=name, reset_value=value) if name else dict(reset_epoch=0)
            run_cfg = dataclasses.replace(task_cfg, methods=(method,), progress=False, **changes)
            result = common.run_method(method, session.model_fn, session.data, run_cfg)
            label = f"{name}={value:g}" if name else "none"
            runs.append({"method": method, "reset": label, "reset_epoch": epoch if name else None, **result})
            bar.set_postfix_str(f"{method} reset {label} test={result['final'].get('test_loss')}", refresh=False)
            bar.update()
    return {"reset_epoch": epoch, "runs": runs}


GRID_COLUMNS = (("method", "method", ""), ("median", "median test loss", ".4f"), ("q25", "q25", ".4f"),
                ("q75", "q75", ".4f"), ("min", "min", ".4f"), ("max", "max", ".4f"),
                ("diverged", "diverged", "d"), ("runs", "runs", "d"))
RESET_COLUMNS = (("run", "run", ""), ("test_loss", "final test loss", ".4f"), ("lr", "final lr", ".3g"),
                 ("weight_decay", "final wd", ".3g"))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    session = common.open_session(RobustnessConfig, argv)
    cfg = session.cfg
    start = time.perf_counter()
    total = (len(cfg.grid_methods) * len(cfg.grid_lrs) * len(cfg.grid_wds) if "grid" in cfg.parts else 0) + \
            (len(cfg.reset_methods) * (1 + len(cfg.resets)) if "reset" in cfg.parts else 0)
    payload = session.header("robustness")
    with tqdm(total=total, desc="robustness", disable=not session.task_cfg.progress, dynamic_ncols=True) as bar:
        if "grid" in cfg.parts:
            payload["grid"] = run_grid(session, bar)
        if "reset" in cfg.parts:
            payload["reset"] = run_resets(session, bar)
    payload["total_wall_time_s"] = time.perf_counter() - start
    path = common.write_results(payload, session.path("robustness"))

    print(f"\nrobustness on {session.task.name} ({session.task_cfg.epochs} epochs)")
    if "grid" in payload:
        print(f"final test loss over {len(cfg.grid_lrs)} x {len(cfg.grid_wds)} initial (lr, weight decay):")
        print(common.format_table([{k: (None if isinstance(v, float) and math.isinf(v) else v)
                                    for k, v in row.items()} for row in payload["grid"]["summary"]], GRID_COLUMNS))
    if "reset" in payload:
        print(f"resets before epoch {payload['reset']['reset_epoch']}:")
        rows = [{"run": f"{r['method']} / {r['reset']}", "test_loss": r["final"].get("test_loss"),
                 "lr": common.geometric_mean(r["final"].get("lr")),
                 "weight_decay": common.geometric_mean(r["final"].get("weight_decay"))}
                for r in payload["reset"]["runs"]]
        print(common.format_table(rows, RESET_COLUMNS))
    print(f"results: {path}  ({payload['total_wall_time_s']:.0f} s in all)")
    payload["path"] = str(path)
    return payload


if __name__ == "__main__":
    main()
