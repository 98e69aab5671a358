"""The evidence behind OHO's default horizon and meta-update.

A user who sets no meta-hyperparameter must get sensible tuning whatever the scale of the problem. This
script runs global OHO on scikit-learn's digits (real data) for two models of different kinds (the
paper's 4-layer ReLU MLP and a small CNN), from initial learning rates spanning three decades
(1e-3 .. 1, the last one far too large with momentum 0.9), for each candidate setting of the horizon
and the meta-optimizer, next to the same runs with the learning rate frozen. It reports, per
candidate: runs that diverged, the median and worst final test loss, and how far apart the final
learning rates of the different starts ended (log10 spread: 0 means every start found the same lr).

    python benchmarks/defaults.py                    # ~15 minutes on 2 CPU cores
    python benchmarks/defaults.py --epochs 5 --lrs 0.01 --candidates greedy   # a smoke run
    python benchmarks/defaults.py --summarise benchmarks/results/defaults/defaults.json  # re-print a table
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import common

# name -> the method (its name sets the horizon, see common.optimizers) and further OHO keyword arguments
# (Python literals, as digits.py's --oho-options takes them)
CANDIDATES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "full_b999": ("oho_global_full", ("meta_betas=(0.9,0.999)",)),
    "full_b99": ("oho_global_full", ("meta_betas=(0.9,0.99)",)),
    "discount0.99_b99": ("oho_global_discount0.99", ("meta_betas=(0.9,0.99)",)),
    "discount0.9_b99": ("oho_global_discount0.9", ("meta_betas=(0.9,0.99)",)),
    "greedy_b999": ("oho_global_greedy", ("meta_betas=(0.9,0.999)",)),
    "greedy": ("oho_global_greedy", ("meta_betas=(0.9,0.99)",)),
    "greedy_metalr0.05": ("oho_global_greedy", ("meta_betas=(0.9,0.99)", "meta_lr=0.05")),
    "greedy_metalr0.01": ("oho_global_greedy", ("meta_betas=(0.9,0.99)", "meta_lr=0.01")),
}


@dataclass
class Config:
    candidates: Tuple[str, ...] = tuple(CANDIDATES)
    models: Tuple[str, ...] = ("mlp", "cnn")
    lrs: Tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    epochs: int = 30
    momentum: float = 0.9
    seed: int = 0
    progress: bool = False
    out: str = ""  # default: benchmarks/results/defaults/defaults.json
    summarise: str = ""  # a results file: recompute and print its summary (rewriting it), no training


def _first(value: Any) -> Any:
    """Global OHO has one group: the results files list per-group values."""
    return value[0] if isinstance(value, list) else value


def _spread(values: List[float]) -> Optional[float]:
    finite = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if len(finite) < 2:
        return None
    return math.log10(max(finite)) - math.log10(min(finite))


def summarise(runs: List[Dict[str, Any]], cfg: Config) -> Dict[str, Any]:
    """Per candidate: collapsed runs, median / worst final test loss (also over the starts below 1,
    since lr 1 with momentum 0.9 wrecks the weights in its first steps whatever tunes it), and the
    log10 spread of the final lrs reached from the different starts (per model, starts below 1)."""
    summary = {}
    for name in ["frozen"] + list(cfg.candidates):
        mine = [r for r in runs if r["candidate"] == name]
        losses = [r["test_loss"] if r["test_loss"] is not None else math.inf for r in mine]
        usable = [l for r, l in zip(mine, losses) if r["lr0"] < 1.0]
        spreads = [_spread([r["final_lr"] for r in mine if r["model"] == m and r["lr0"] < 1.0])
                   for m in cfg.models]
        summary[name] = {
            "diverged": sum(r["diverged"] or r["test_loss"] is None for r in mine),
            "median_test_loss": statistics.median(losses),
            "worst_test_loss": max(losses),
            "worst_test_loss_lr0_below_1": max(usable) if usable else None,
            "lr_spread_log10": {m: s for m, s in zip(cfg.models, spreads)} if name != "frozen" else None,
        }
    print(f"\n{'candidate':20s} {'diverged':>8s} {'median test':>12s} {'worst test':>11s} {'worst (lr0<1)':>14s}"
          "  final-lr spread (log10)")
    for name, s in summary.items():
        spread = "" if s["lr_spread_log10"] is None else "  ".join(
            f"{m}: {v:.2f}" if v is not None else f"{m}: -" for m, v in s["lr_spread_log10"].items())
        worst_usable = s["worst_test_loss_lr0_below_1"]
        print(f"{name:20s} {s['diverged']:8d} {s['median_test_loss']:12.4f} {s['worst_test_loss']:11.4f} "
              f"{worst_usable if worst_usable is not None else float('nan'):14.4f}  {spread}")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = common.parse_config(argv, Config)
    unknown = [c for c in cfg.candidates if c not in CANDIDATES]
    if unknown:
        raise ValueError(f"Unknown candidate(s) {unknown}; choose from {sorted(CANDIDATES)}")
    if cfg.summarise:
        import json
        from pathlib import Path
        payload = json.loads(Path(cfg.summarise).read_text())
        stored = Config(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in payload["config"]["defaults"].items() if k != "summarise"})
        payload["summary"] = summarise(payload["runs"], stored)
        common.write_results(payload, Path(cfg.summarise))
        return payload
    task = common.load_task("digits")
    runs: List[Dict[str, Any]] = []
    device = None
    for model_name in cfg.models:
        base = task.config(model=model_name, epochs=cfg.epochs, momentum=cfg.momentum, seed=cfg.seed,
                           progress=cfg.progress, methods=("sgd",))
        device = common.setup_runtime(base)
        data = task.load_data(base, device)
        for lr in cfg.lrs:
            settings = [("frozen", "sgd", ())] + [(c, *CANDIDATES[c]) for c in cfg.candidates]
            for name, method, options in settings:
                meta_lr = [float(o.split("=")[1]) for o in options if o.startswith("meta_lr=")]
                rest = tuple(o for o in options if not o.startswith("meta_lr="))
                run_cfg = dataclasses.replace(base, lr=lr, oho_options=rest, methods=(method,),
                                              meta_lr=meta_lr[0] if meta_lr else None)
                result = common.run_method(method, task.model_fn(run_cfg, data), data, run_cfg)
                final = result["final"]
                runs.append({"model": model_name, "lr0": lr, "candidate": name, "method": method,
                             "options": list(options),
                             "test_loss": final.get("test_loss"), "test_acc": final.get("test_acc"),
                             "val_loss": final.get("val_loss"), "final_lr": _first(final.get("lr")),
                             "final_weight_decay": _first(final.get("weight_decay")), "diverged": final["diverged"],
                             "wall_time_s": final["wall_time_s"], "lr_curve": result["curves"].get("lr")})
                print(f"{model_name:4s} lr0={lr:<6g} {name:18s} test loss {final.get('test_loss')}  "
                      f"final lr {_first(final.get('lr'))}  diverged {final['diverged']}", flush=True)

    summary = summarise(runs, cfg)
    payload = common.payload_header("defaults", "digits", {"defaults": cfg}, device, synthetic=False)
    payload.update(runs=runs, summary=summary)
    from pathlib import Path
    path = Path(cfg.out) if cfg.out else common.RESULTS_DIR / "defaults" / "defaults.json"
    common.write_results(payload, path)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
