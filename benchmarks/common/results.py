"""Results: JSON files, tables and statistics."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .runtime import RESULTS_DIR, environment


def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x



def results_path(cfg: Any, task: str, kind: str, tag: str, synthetic: bool) -> Path:
    """``--out`` if given, else ``<results_dir or benchmarks/results/<task>>/<kind>_<tag>[_quick][_synthetic].json``."""
    if cfg.out:
        return Path(cfg.out)
    directory = Path(cfg.results_dir) if cfg.results_dir else RESULTS_DIR / task
    name = kind + "_" + tag + ("_quick" if cfg.quick else "") + ("_synthetic" if synthetic else "")
    return directory / f"{name}.json"


def _jsonable(value: Any) -> Any:
    """Plain JSON: tuples as lists, non-finite floats as null (diverged runs are flagged separately)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


def payload_header(kind: str, task: str, configs: Dict[str, Any], device: torch.device, synthetic: bool,
                   env: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The fields every results file starts with: what ran, on what, with which configuration.

    ``env`` is :func:`environment` taken when the run started (taken now if omitted).
    """
    return {
        "kind": kind,
        "task": task,
        "synthetic": synthetic,
        "config": {name: dataclasses.asdict(c) for name, c in configs.items()},
        "environment": env if env is not None else environment(device),
    }


def _dumps(value: Any, level: int = 0) -> str:
    """JSON with one key per line but every list of numbers on one line: readable and small."""
    pad = " " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(pad + _dumps(v, level + 1) for v in value) + "\n" + " " * level + "]"
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def write_results(payload: Dict[str, Any], path: Path) -> Path:
    """Write a results file (creating its directory) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(_jsonable(payload)) + "\n")
    return path


def format_table(rows: List[Dict[str, Any]], columns: Sequence[Tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, header, format spec); None shows as '-'."""
    def cell(row: Dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        return "-" if value is None else format(value, spec)

    cells = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, ((_, h, _), w) in enumerate(zip(columns, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))))
    return "\n".join(lines)


def geometric_mean(values: Optional[Sequence[float]]) -> Optional[float]:
    """Geometric mean of the positive entries (one number for per-group hyperparameters)."""
    values = [v for v in (values or []) if v is not None]
    positive = [v for v in values if v > 0]
    if not positive:
        return 0.0 if values else None
    return math.exp(sum(map(math.log, positive)) / len(positive))


def _mean_std(values: Sequence[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return float(np.mean(finite)), (float(np.std(finite, ddof=1)) if len(finite) > 1 else None)


def summary_rows(results: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per method of a comparison: means (and the test loss's standard deviation) over the
    seeds that did not diverge, final hyperparameters as geometric means over groups and seeds."""
    rows = []
    for method, runs in results.items():
        finals = [run["final"] for run in runs]
        test_loss, test_loss_std = _mean_std([f.get("test_loss") for f in finals])
        row: Dict[str, Any] = {"method": method, "test_loss": test_loss, "test_loss_std": test_loss_std}
        for key in ("test_acc", "val_loss", "test_loss_at_best_val", "wall_time_s"):
            row[key] = _mean_std([f.get(key) for f in finals])[0]
        for name in ("lr", "weight_decay"):
            row[name] = geometric_mean([v for f in finals for v in (f.get(name) or [])])
        row.update(groups=len(runs[0]["groups"]), seeds=len(runs), diverged=sum(f["diverged"] for f in finals),
                   per_seed_test_loss=[f.get("test_loss") for f in finals],
                   per_seed_test_acc=[f.get("test_acc") for f in finals])
        rows.append(row)
    return rows


SUMMARY_COLUMNS = (
    ("method", "method", ""), ("test_loss", "test loss", ".4f"), ("test_loss_std", "+-", ".4f"),
    ("test_acc", "test acc", ".4f"), ("val_loss", "val loss", ".4f"),
    ("test_loss_at_best_val", "test@best val", ".4f"), ("lr", "final lr", ".3g"),
    ("weight_decay", "final wd", ".3g"), ("groups", "groups", "d"), ("wall_time_s", "train s", ".1f"),
    ("diverged", "diverged", "d"),
)
