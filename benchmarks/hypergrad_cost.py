"""Time and memory of hypergradients against the horizon T and the number K of hyperparameter scalars.

A tanh MLP (64-32-10 by default) trains T steps of SGD with momentum 0.9 on minibatches of digits; the
training loss weights each example by one of K hyperparameters (example i reads weight i mod K), so K
changes nothing but the number of hyperparameter scalars. For each (T, K) it measures the wall-clock per
inner step (wall-clock and process CPU time: on a shared machine the CPU time is the steadier figure,
and the one plotted) and the memory each method holds for its backward or tangent pass:

* ``unroll``: the training run alone (no hypergradient), the time unit;
* ``reverse``: reverse mode through the stored trajectory (memory: T states of (w, b));
* ``truncated``: reverse through the last T/4 steps only;
* ``exact``: reverse through the exact reversal (memory: the information buffers plus one state);
* ``forward``: one tangent per scalar (run only while K <= ``forward_max_k``).

    python benchmarks/hypergrad_cost.py               # writes benchmarks/results/hypergrad/hypergrad_cost.json
    python benchmarks/hypergrad_cost.py --quick true  # seconds
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import common
import hypergrad_common as hc

ohotorch = common.import_ohotorch()
from ohotorch import hypergrad  # noqa: E402


@dataclass
class Config(hc.BaseConfig):
    widths: Tuple[int, ...] = (64, 32, 10)
    batch_size: int = 50
    pool: int = 1000  # training examples the minibatches come from
    lr: float = 0.05
    momentum: float = 0.9
    horizons: Tuple[int, ...] = (10, 20, 40, 80, 160)  # T, with K = k_at_horizons
    k_at_horizons: int = 10
    ks: Tuple[int, ...] = (1, 4, 16, 64, 256, 1000)  # K, with T = horizon_at_ks
    horizon_at_ks: int = 20
    forward_max_k: int = 64
    repeats: int = 2  # the fastest of this many runs is reported

    PRESETS = {"quick": {"horizons": (4, 8), "ks": (1, 4), "horizon_at_ks": 4, "pool": 200, "widths": (64, 8, 10),
                         "repeats": 1, "forward_max_k": 4}}


def problem(cfg: Config, steps: int, k: int):
    (x, y), (xv, yv) = hc.digits((cfg.pool, 300), cfg.seed)
    w0 = hc.mlp_init(cfg.widths, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    batches = [torch.randint(0, cfg.pool, (cfg.batch_size,), generator=g) for _ in range(steps)]

    def train_loss(w, h, t):
        idx = batches[t]
        losses = F.cross_entropy(hc.mlp_forward(w, x[idx]), y[idx], reduction="none")
        return (losses * h["weights"][idx % k]).mean()

    def val_loss(w, h):
        return F.cross_entropy(hc.mlp_forward(w, xv), yv)

    # momentum on the exact reversal's grid (multiples of 2**-16), so every method solves the same problem
    mu = round(cfg.momentum * 2 ** 16) / 2 ** 16
    hypers = {"weights": torch.ones(k, dtype=hc.DT), "lr": torch.tensor(cfg.lr, dtype=hc.DT),
              "mu": torch.tensor(mu, dtype=hc.DT)}
    return train_loss, val_loss, w0, hypers


def measure(cfg: Config, steps: int, k: int, methods: Sequence[str]) -> Dict[str, Any]:
    train_loss, val_loss, w0, hypers = problem(cfg, steps, k)
    opt = hypergrad.SGD(lr="lr", momentum="mu")
    calls = {
        "unroll": lambda: hypergrad.unroll(train_loss, w0, hypers, opt, steps),
        "reverse": lambda: hypergrad.reverse_hypergradient(train_loss, val_loss, w0, hypers, opt, steps),
        "truncated": lambda: hypergrad.reverse_hypergradient(train_loss, val_loss, w0, hypers, opt, steps,
                                                             truncate=max(1, steps // 4)),
        "exact": lambda: hypergrad.exact_reverse_hypergradient(train_loss, val_loss, w0, hypers, opt, steps),
        "forward": lambda: hypergrad.forward_hypergradient(train_loss, val_loss, w0, hypers, opt, steps),
    }
    row: Dict[str, Any] = {"T": steps, "K": k + 2, "K_example_weights": k, "n_weights": sum(p.numel() for p in w0)}
    results = {}
    for name in methods:
        best, best_cpu = float("inf"), float("inf")
        for _ in range(cfg.repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            out = calls[name]()
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, time.process_time() - start_cpu)
        results[name] = out
        row[f"{name}_s_per_step"] = best / steps
        row[f"{name}_cpu_s_per_step"] = best_cpu / steps
        if name != "unroll":
            row[f"{name}_bytes"] = out.memory_bytes
    if "exact" in results:
        row["exact_trajectory_bytes"] = results["exact"].info["trajectory_bytes"]
        row["exact_bits_per_weight_per_step"] = results["exact"].info["bits_per_weight_per_step"]
        row["exact_recovered_initial"] = results["exact"].info["recovered_initial"]
    if "reverse" in results:
        ref = results["reverse"].grads["weights"]
        for name in ("exact", "forward"):
            if name in results:
                row[f"{name}_vs_reverse_rel_err"] = float((results[name].grads["weights"] - ref).abs().max()
                                                          / ref.abs().max())
    return row


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = common.parse_config(argv, Config)
    payload = hc.header(cfg, "hypergrad_cost")
    torch.func.grad(lambda z: (z ** 2).sum())(torch.ones(2, dtype=hc.DT))  # warm torch.func up
    all_methods = ("unroll", "reverse", "truncated", "exact", "forward")
    horizon_rows = []
    for steps in cfg.horizons:
        methods = [m for m in all_methods if m != "forward" or cfg.k_at_horizons <= cfg.forward_max_k]
        horizon_rows.append(measure(cfg, steps, cfg.k_at_horizons, methods))
        print(horizon_rows[-1], flush=True)
    k_rows = []
    for k in cfg.ks:
        methods = [m for m in all_methods if m != "forward" or k <= cfg.forward_max_k]
        k_rows.append(measure(cfg, cfg.horizon_at_ks, k, methods))
        print(k_rows[-1], flush=True)
    payload["against_T"] = horizon_rows
    payload["against_K"] = k_rows
    path = hc.write(payload, cfg, "hypergrad_cost")
    plot(payload, hc.figure_path(path))
    return payload


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, xname, ax_time in (("against_T", "T", axes[0]), ("against_K", "K", axes[1])):
        rows = payload[key]
        for m in ("unroll", "reverse", "truncated", "exact", "forward"):
            pts = [(r[xname], r[f"{m}_cpu_s_per_step"] * 1e3) for r in rows if f"{m}_cpu_s_per_step" in r]
            if pts:
                ax_time.plot(*zip(*pts), "o-", label=m)
        ax_time.set_xscale("log")
        ax_time.set_yscale("log")
        ax_time.set_xlabel(f"{xname} (" + ("steps" if xname == "T" else "hyperparameter scalars") + ")")
        ax_time.set_ylabel("CPU ms per inner step (process time)")
        ax_time.legend()
    rows = payload["against_T"]
    for m, label in (("reverse", "stored trajectory"), ("truncated", "truncated (T/4)"),
                     ("exact", "exact reversal"), ("forward", "forward tangents")):
        pts = [(r["T"], r[f"{m}_bytes"] / 1024) for r in rows if f"{m}_bytes" in r]
        if pts:
            axes[2].plot(*zip(*pts), "o-", label=label)
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("T (steps)")
    axes[2].set_ylabel("KiB held for the backward / tangent pass")
    axes[2].legend()
    env = payload["environment"]
    fig.suptitle(f"hypergradient cost, MLP {payload['config']['widths']}, float64, {env['device_name']} "
                 f"({env['torch_threads']} thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
