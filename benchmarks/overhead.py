"""Cost of an OHO step against a plain torch.optim.SGD step, measured side by side in one run.

For each model (an MLP on MNIST-shaped input, torchvision's ResNet18 on CIFAR-shaped input) it times:

* ``sgd``: forward, backward, torch.optim.SGD.step (the baseline every ratio divides by);
* ``oho_greedy``: OHO with its default greedy horizon (no HVP), ``hyper_step`` every step;
* ``oho_global``: OHO, one hyper group, full horizon (exact RTRL), ``hyper_step`` every step;
* ``oho_global_h10``: the same with ``hyper_step`` every 10 steps;
* ``oho_layer_blockwise`` / ``oho_layer_exact``: one hyper group per layer;
* ``adam``: torch.optim.Adam, the baseline of ``oho_adam_greedy`` / ``oho_adam_global`` (OHOAdam with the
  default greedy horizon, and with the full horizon); ``adamw`` likewise for ``oho_adamw_global``.

and reports median milliseconds per step, the ratio to ``sgd``, and memory: the optimizer state in
units of the parameters' size (exact, any device) and, on CUDA, the peak allocated memory above the
plain run's peak. Every variant sees the same batches, is warmed up, and is timed over ``iters``
steps with device synchronisation around each step.

    python benchmarks/overhead.py                               # CPU or the GPU present
    python benchmarks/overhead.py --models resnet18 --batch-size 128 --iters 50
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import common

ohotorch = common.import_ohotorch()

VARIANTS = ("sgd", "oho_greedy", "oho_global", "oho_global_h10", "oho_layer_blockwise", "oho_layer_exact",
            "adam", "oho_adam_greedy", "oho_adam_global", "adamw", "oho_adamw_global")


def baseline_of(variant: str) -> str:
    """The plain torch.optim step a variant's ratio divides by."""
    for name in ("adamw", "adam"):
        if name in variant:
            return name
    return "sgd"


@dataclass
class Config:
    models: Tuple[str, ...] = ("mlp", "resnet18")
    variants: Tuple[str, ...] = VARIANTS
    batch_size: int = 128
    val_batch_size: int = 128
    iters: int = 20  # timed steps per variant
    warmup: int = 3
    momentum: float = 0.9
    hvp: str = "forward"
    exact_layer_max_tangents: int = 64  # skip oho_layer_exact when it would carry more tangents
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    out: str = ""  # default: benchmarks/results/overhead/overhead_<device>.json


def build(name: str) -> Tuple[nn.Module, Tuple[int, ...]]:
    if name == "mlp":  # MNIST-shaped: 784 -> 1000 -> 1000 -> 10
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
                              nn.Linear(1000, 10))
        return model, (1, 28, 28)
    if name == "resnet18":  # CIFAR-shaped, the 32x32 adaptation (3x3 stem, no max-pool)
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model, (3, 32, 32)
    raise ValueError(f"Unknown model {name!r}")


def make_optimizer(variant: str, model: nn.Module, cfg: Config):
    if variant == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=cfg.momentum)
    if variant in ("adam", "adamw"):
        return (torch.optim.Adam if variant == "adam" else torch.optim.AdamW)(model.parameters(), lr=1e-3)
    if variant.startswith(("oho_adam_", "oho_adamw_")):
        cls = ohotorch.OHOAdamW if variant.startswith("oho_adamw_") else ohotorch.OHOAdam
        return cls(model.parameters(), lr=1e-3, module=model, hvp=cfg.hvp,
                   discount=0.0 if variant.endswith("_greedy") else 1.0)
    if variant == "oho_greedy":  # the defaults
        return ohotorch.OHO(model.parameters(), lr=0.01, momentum=cfg.momentum, module=model)
    params = model.parameters() if variant.startswith("oho_global") else ohotorch.layerwise(model)
    influence = "exact" if variant in ("oho_global", "oho_global_h10", "oho_layer_exact") else "blockwise"
    return ohotorch.OHO(params, lr=0.01, momentum=cfg.momentum, module=model, influence=influence, hvp=cfg.hvp,
                        discount=1.0)


def state_size(opt: torch.optim.Optimizer, model: nn.Module) -> float:
    """Optimizer state in units of the parameters' size."""
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return state / params


def time_variant(variant: str, name: str, cfg: Config, device: torch.device,
                 batches: List[Tuple[torch.Tensor, ...]]) -> Dict[str, Any]:
    common.seed_everything(cfg.seed)
    model, _ = build(name)
    model.to(device).train()
    opt = make_optimizer(variant, model, cfg)
    every = 10 if variant.endswith("_h10") else 1
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def one_step(i: int) -> None:
        x, y, xv, yv = batches[i % len(batches)]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if variant in ("sgd", "adam", "adamw"):
            closure()
            opt.step()
            return

        def val_closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xv), yv)
            loss.backward()
            return loss

        opt.step(closure)
        if (i + 1) % every == 0:
            opt.hyper_step(val_closure)

    for i in range(cfg.warmup):
        one_step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    # h10 is timed over whole 10-step cycles so that the average includes its hyper-steps.
    steps = cfg.iters if every == 1 else max(cfg.iters // 10, 1) * 10
    start_index = cfg.warmup
    if every > 1:
        start_index = ((cfg.warmup + every - 1) // every) * every
        for i in range(cfg.warmup, start_index):
            one_step(i)
        sync()
    for i in range(start_index, start_index + steps):
        t0 = time.perf_counter()
        one_step(i)
        sync()
        times.append(time.perf_counter() - t0)
    if every > 1:  # mean over cycles: the hyper-step happens once per cycle
        cycle_ms = [1e3 * sum(times[k:k + every]) / every for k in range(0, len(times), every)]
        ms = statistics.median(cycle_ms)
    else:
        ms = 1e3 * statistics.median(times)
    result = {"ms": ms, "state_x_params": state_size(opt, model),
              "tangents": len(getattr(opt, "_oho", {}).get("keys") or [])}
    if device.type == "cuda":
        result["peak_mb_above_start"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = common.parse_config(argv, Config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: Dict[str, Any] = {}
    for name in cfg.models:
        model, shape = build(name)
        n_layers = len(ohotorch.layerwise(model))
        g = torch.Generator().manual_seed(cfg.seed)
        batches = [
            tuple(t.to(device) for t in (
                torch.rand(cfg.batch_size, *shape, generator=g), torch.randint(0, 10, (cfg.batch_size,), generator=g),
                torch.rand(cfg.val_batch_size, *shape, generator=g),
                torch.randint(0, 10, (cfg.val_batch_size,), generator=g)))
            for _ in range(4)
        ]
        rows = {}
        for variant in cfg.variants:
            if variant == "oho_layer_exact" and 2 * n_layers > cfg.exact_layer_max_tangents:
                rows[variant] = {"skipped": f"{2 * n_layers} tangents > exact_layer_max_tangents"}
                continue
            rows[variant] = time_variant(variant, name, cfg, device, batches)
        for variant, row in rows.items():
            base = rows.get(baseline_of(variant), {})
            if "ms" in row and "ms" in base:
                row["baseline"] = baseline_of(variant)
                row["ratio_to_baseline"] = row["ms"] / base["ms"]
            if device.type == "cuda" and "peak_mb_above_start" in row and "peak_mb_above_start" in base:
                row["peak_extra_mb_vs_baseline"] = row["peak_mb_above_start"] - base["peak_mb_above_start"]
        params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        results[name] = {"layers": n_layers, "params_mb": params_mb, "variants": rows}
        print(f"\n{name} ({n_layers} layers, {params_mb:.1f} MB of parameters), batch {cfg.batch_size}, "
              f"device {device}")
        print(f"  {'variant':22s} {'ms/step':>9s} {'x base':>7s} {'state/params':>13s} {'tangents':>9s}")
        for variant, row in rows.items():
            if "skipped" in row:
                print(f"  {variant:22s} skipped: {row['skipped']}")
                continue
            print(f"  {variant:22s} {row['ms']:9.2f} {row.get('ratio_to_baseline', float('nan')):7.2f} "
                  f"{row['state_x_params']:13.2f} {row['tangents']:9d}  (vs {baseline_of(variant)})"
                  + (f"  peak +{row['peak_extra_mb_vs_baseline']:.0f} MB" if "peak_extra_mb_vs_baseline" in row else ""))
    payload = {"kind": "overhead", "config": cfg.__dict__, "environment": common.environment(device),
               "results": results}
    from pathlib import Path
    path = Path(cfg.out) if cfg.out else common.RESULTS_DIR / "overhead" / f"overhead_{device.type}.json"
    common.write_results(payload, path)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
