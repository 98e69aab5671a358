"""Cost of an OHO step against the plain torch.optim step, measured side by side in one run.

For each model (an MLP on MNIST-shaped input, torchvision's ResNet18 on CIFAR-shaped input) it times:

* ``sgd``: forward, backward, torch.optim.SGD.step (the baseline of the SGD-family variants);
* ``oho_greedy``: OHO, one hyper group, the default greedy horizon (no HVP), ``hyper_step`` every step;
* ``oho_global_full``: OHO, one hyper group, full horizon (exact RTRL), ``hyper_step`` every step;
* ``oho_global_full_h10``: the same with ``hyper_step`` every 10 steps;
* ``oho_layer_blockwise_full`` / ``oho_layer_exact_full``: one hyper group per layer, full horizon;
* ``adam``: torch.optim.Adam, the baseline of ``oho_adam_greedy`` / ``oho_adam_full`` (OHOAdam with the
  default greedy horizon, and with the full horizon); ``adamw`` likewise for ``oho_adamw_full``.

The names are the benchmarks' method names (``common.optimizers``: the same name builds the same
optimizer in every script); any other name of that grammar may be given to ``--variants``. Results
files written before the names were unified used ``oho_global``, ``oho_global_h10``,
``oho_layer_blockwise``, ``oho_layer_exact``, ``oho_adam_global`` and ``oho_adamw_global`` for the full
horizon rows that are now ``*_full``.

and reports median milliseconds per step, the ratio to the matching plain step, and memory. Every
variant sees the same batches, is warmed up, and is timed over ``iters`` steps with device
synchronisation only around the block of ``iters`` steps, as in a training loop (``--repeats R``: R
interleaved passes over the variants, the median of the R passes). ``issue_ms``: the host's time to
return from one step (and hyper-step) started on an idle device, any blocking sync included, and any
wait for room in the device's launch queue, which a long step can fill (then it approaches the step's
GPU time: ``host_ms`` is the host measure).

**Where the time goes** (CUDA; ``--profile-steps N``, 0 turns it off). After the timed steps each
variant runs N more steps (whole hyper-step cycles for ``_h10``) three times:

* under ``torch.profiler``: ``kernel_ms`` is the summed time of everything that ran on the GPU (kernels,
  copies, fills) per step, and ``host_ms`` the host's time per step inside the step and hyper-step
  (the ``record_function`` around them, Python included) minus the time the host spent blocked in a
  CUDA synchronisation call; ``kernel_ratio`` divides ``kernel_ms`` by the plain step's, the floor
  that the wall ratio ``ratio_to_baseline`` cannot go below; ``gpu_busy`` is ``kernel_ms / ms``;
* under ``torch.cuda.set_sync_debug_mode("warn")``: ``syncs_per_step``, the synchronising CUDA calls
  torch reports per step (``.item()``, ``.tolist()``, ``bool()`` of a device tensor, blocking copies);
* ``host_waits_per_step``: how often OHO's deferred read-back of device results
  (:mod:`ohotorch.deferred`) found its copy not yet landed and waited for it.

**Settings.** Each (precision, compiled) pair is a separate set of rows, and each OHO row divides by
the plain step of its own setting:

* ``--precisions fp32,bf16``: ``bf16`` runs every closure (training, finite-difference and validation)
  under ``torch.autocast(device_type, dtype=torch.bfloat16)``; parameters, gradients, optimizer state
  and tangents stay float32, and OHO/OHOAdam/OHOAdamW get ``compute_dtype=torch.bfloat16`` (the
  finite-difference step sized for bf16's rounding). The plain baseline runs under the same autocast.
* ``--compiled true`` (``false,true`` for both): the model is ``torch.compile``'d (``--compile-mode``,
  ``--compile-backend``), the baseline's too; the optimizers stay eager. Compilation happens in the
  warm-up, which is then at least 3 steps (the first OHO step has no HVP yet, the second has). Dynamo
  is reset before every variant; each row records the frames compiled during warm-up, the seconds the
  warm-up took, the recompiles during the timed steps, and the guard failures behind any recompile
  (warm-up included: a validation batch of another size than the training batch adds one). OHO writes
  its finite-difference perturbations into the parameters in place, which must cause none.

Rows are keyed by variant for fp32 eager (the default run, as before) and ``variant@setting``
otherwise (``oho_global_full@bf16``, ``sgd@fp32+compiled``).

**Memory.** ``state_x_params``: the optimizer state in units of the parameters' size (exact, any
device). On CUDA, with the cache emptied and the peak statistics reset before each variant builds its
model (cuBLAS and cuDNN have made their workspaces before the first one):

* ``peak_x_params``: the peak allocated memory during the timed steps, counted from before the model
  was built (parameters, gradients, optimizer state, activations, temporaries), in units of the
  parameters' size;
* ``extra_peak_x_params``: the same minus the plain baseline's, to hold against the goal ``K + 2``
  (``goal_x_params``, K = ``tangents``, one per tuned scalar; ``tangent_buffers`` counts the
  parameter-sized tangent tensors in the optimizer state, several per tangent with momentum or Adam);
* ``warmup_peak_x_params``: the peak during warm-up (state creation, compilation);
* ``peak_mb_above_start``: the peak above the memory held after warm-up (what earlier versions
  reported, which leaves out the optimizer state).

    python benchmarks/overhead.py                               # CPU or the GPU present
    python benchmarks/overhead.py --models resnet18 --batch-size 128 --iters 50
    python benchmarks/overhead.py --precisions fp32,bf16 --compiled false,true
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torchvision
from torch import nn

import common

ohotorch = common.import_ohotorch()

VARIANTS = ("sgd", "oho_greedy", "oho_global_full", "oho_global_full_h10", "oho_layer_blockwise_full",
            "oho_layer_exact_full", "adam", "oho_adam_greedy", "oho_adam_full", "adamw", "oho_adamw_full")
PLAIN = ("sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16")
COMPILE_WARMUP = 3  # compile, then the first step with an HVP, then one more


def baseline_of(variant: str) -> str:
    """The plain torch.optim step a variant's ratio divides by."""
    for name in ("adamw", "adam"):
        if name in variant:
            return name
    return "sgd"


def setting_name(precision: str, compiled: bool) -> str:
    return precision + ("+compiled" if compiled else "")


def row_key(variant: str, precision: str, compiled: bool) -> str:
    """``variant`` for fp32 eager (the rows of earlier versions), else ``variant@setting``."""
    if precision == "fp32" and not compiled:
        return variant
    return f"{variant}@{setting_name(precision, compiled)}"


@dataclass
class Config:
    models: Tuple[str, ...] = ("mlp", "resnet18")
    variants: Tuple[str, ...] = VARIANTS
    precisions: Tuple[str, ...] = ("fp32",)  # fp32, bf16 (autocast closures, compute_dtype=torch.bfloat16)
    compiled: Tuple[bool, ...] = (False,)  # true: torch.compile(model); false,true: both
    compile_mode: str = "default"  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    compile_backend: str = "inductor"
    batch_size: int = 128
    val_batch_size: int = 128
    iters: int = 20  # timed steps per variant
    warmup: int = 3  # at least 3 when compiled
    momentum: float = 0.9
    hvp: str = "forward"
    repeats: int = 1  # interleaved passes over the variants; each row reports the median pass
    profile_steps: int = 10  # CUDA: steps profiled for kernel time, host time and syncs (0: off)
    exact_layer_max_tangents: int = 64  # skip oho_layer_exact* when it would carry more tangents
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    out: str = ""  # default: benchmarks/results/overhead/overhead_<device>[_<precisions>][_compiled].json

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants
                   if v not in PLAIN and not (v.startswith("oho") and common.is_method(v))]
        if unknown:
            raise ValueError(f"Unknown variant(s) {unknown}; choose from {VARIANTS} or another OHO method name "
                             "(common.optimizers)")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"Invalid precisions {self.precisions}; choose from {PRECISIONS}")
        if not self.compiled:
            raise ValueError("--compiled needs at least one of false, true")
        for name in ("iters", "batch_size", "val_batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")

    def suffix(self) -> str:
        """The default results file's tag: empty for the default fp32 eager run."""
        if self.precisions == ("fp32",) and tuple(self.compiled) == (False,):
            return ""
        compiled = {(False,): "", (True,): "_compiled"}.get(tuple(sorted(set(self.compiled))), "_eager_compiled")
        return "_" + "_".join(self.precisions) + compiled


def build(name: str) -> Tuple[nn.Module, Tuple[int, ...]]:
    if name == "mlp":  # MNIST-shaped: 784 -> 1000 -> 1000 -> 10
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
                              nn.Linear(1000, 10))
        return model, (1, 28, 28)
    if name == "mlp_gelu":  # the same MLP with a smooth activation: no ReLU kinks for finite differences to cross
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1000), nn.GELU(), nn.Linear(1000, 1000), nn.GELU(),
                              nn.Linear(1000, 10))
        return model, (1, 28, 28)
    if name == "resnet18":  # CIFAR-shaped, the 32x32 adaptation (3x3 stem, no max-pool)
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model, (3, 32, 32)
    raise ValueError(f"Unknown model {name!r}")


def make_optimizer(variant: str, model: nn.Module, cfg: Config,
                   compute_dtype: Optional[torch.dtype] = None) -> torch.optim.Optimizer:
    """The benchmarks' optimizer of ``variant`` (the one factory, ``common.build_optimizer``) from lr 0.01
    (SGD family, ``cfg.momentum``) or 1e-3 (Adam family), the classes' default weight decay."""
    settings = common.OptimizerSettings(lr=0.01, adam_lr=1e-3, momentum=None if baseline_of(variant) != "sgd"
                                        else cfg.momentum, hvp=cfg.hvp, compute_dtype=compute_dtype)
    opt, _ = common.build_optimizer(variant, model, settings)
    return opt


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def state_size(opt: torch.optim.Optimizer, model: nn.Module, prefix: str = "") -> float:
    """Optimizer state (the entries whose name starts with ``prefix``) in units of the parameters' size."""
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items()
                if isinstance(t, torch.Tensor) and k.startswith(prefix))
    return state / param_bytes(model)


class RecompileLog:
    """Dynamo's recompile messages (each names the guard that failed) while the context is active.

    Turns on torch's ``recompiles`` log artifact, which also prints them on stderr.
    """

    def __init__(self) -> None:
        self.messages: List[str] = []
        self._logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        self._handler = logging.Handler()
        self._handler.emit = lambda record: self.messages.append(record.getMessage())  # type: ignore[method-assign]

    def __enter__(self) -> "RecompileLog":
        torch._logging.set_logs(recompiles=True)
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeHandler(self._handler)
        torch._logging.set_logs()


def _frames_compiled() -> int:
    return int(torch._dynamo.utils.counters["frames"]["total"])


def _reset_dynamo() -> None:
    """Forget every compiled frame (and free what they hold) and zero dynamo's counters."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def time_variant(variant: str, name: str, cfg: Config, device: torch.device,
                 batches: List[Tuple[torch.Tensor, ...]], precision: str = "fp32",
                 compiled: bool = False) -> Dict[str, Any]:
    cuda = device.type == "cuda"
    if compiled:
        _reset_dynamo()
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    common.seed_everything(cfg.seed)
    model, _ = build(name)
    model.to(device).train()
    net = torch.compile(model, mode=cfg.compile_mode, backend=cfg.compile_backend) if compiled else model
    bf16 = precision == "bf16"
    opt = make_optimizer(variant, model, cfg, compute_dtype=torch.bfloat16 if bf16 else None)
    every = common.parse_method(variant).hyper_every or 1
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def one_step(i: int) -> None:
        x, y, xv, yv = batches[i % len(batches)]
        closure = common.make_closure(net, opt, x, y, device, bf16)
        if variant in PLAIN:
            closure()
            opt.step()
            return
        opt.step(closure)
        if (i + 1) % every == 0:
            opt.hyper_step(common.make_closure(net, opt, xv, yv, device, bf16))

    warmup = max(cfg.warmup, COMPILE_WARMUP) if compiled else cfg.warmup
    t0 = time.perf_counter()
    for i in range(warmup):
        one_step(i)
    sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        warmup_peak = torch.cuda.max_memory_allocated(device) - start
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    frames_warmup = _frames_compiled()
    # h10 is timed over whole 10-step cycles so that the average includes its hyper-steps.
    steps = cfg.iters if every == 1 else max(cfg.iters // 10, 1) * 10
    start_index = warmup
    if every > 1:
        start_index = ((warmup + every - 1) // every) * every
        for i in range(warmup, start_index):
            one_step(i)
        sync()
        frames_warmup = _frames_compiled()
    # One block of steps between two device synchronisations, as a training loop runs them: a step may
    # overlap the next (the sync-free path never waits), so per-step synchronisation would hide that.
    sync()
    t0 = time.perf_counter()
    for i in range(start_index, start_index + steps):
        one_step(i)
    sync()
    ms = 1e3 * (time.perf_counter() - t0) / steps
    issue_ms = None
    if cuda:  # the host's time to issue one step (and hyper-step) onto an idle device
        sync()
        t0 = time.perf_counter()
        one_step(start_index + steps)
        issue_ms = 1e3 * (time.perf_counter() - t0)
        sync()
    where: Dict[str, Any] = {}
    if cuda and cfg.profile_steps > 0 and not compiled:
        n_profile = cfg.profile_steps if every == 1 else max(cfg.profile_steps // every, 1) * every
        first = start_index + steps
        where = profile_steps(one_step, range(first + every, first + every + n_profile), sync, opt)
    if issue_ms is not None:
        where["issue_ms"] = issue_ms
    size = param_bytes(model)
    result: Dict[str, Any] = {
        "variant": variant, "precision": precision, "compiled": compiled, "ms": ms,
        "state_x_params": state_size(opt, model), "tangents": len(getattr(opt, "_oho", {}).get("keys") or []),
        "tangent_buffers": round(state_size(opt, model, prefix="tangent_")), "warmup_steps": warmup,
        "warmup_s": warmup_s, **where,
    }
    if compiled:
        result["frames_compiled_warmup"] = frames_warmup
        result["recompiles_timed"] = _frames_compiled() - frames_warmup
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result["peak_mb_above_start"] = (peak - base) / 2**20
        result["peak_total_mb"] = (peak - start) / 2**20
        result["peak_x_params"] = (peak - start) / size
        result["warmup_peak_x_params"] = warmup_peak / size
    return result


SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")


def profile_steps(one_step: Any, indices: range, sync: Any, opt: torch.optim.Optimizer) -> Dict[str, Any]:
    """Kernel time, host time, syncs and deferred-read waits per step over ``indices`` (see the module
    docstring); each pass starts and ends with the device idle."""
    from torch.profiler import ProfilerActivity, profile, record_function

    n = len(indices)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in indices:
            with record_function("overhead_step"):
                one_step(i)
        sync()
    events = prof.events()
    # Kernels, copies and fills; not the GPU-side spans of record_function annotations (this step's,
    # torch.optim's "Optimizer.step#..."), which cover idle time too.
    kernel_us = sum(e.self_device_time_total for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
                    and e.name != "overhead_step" and not e.name.startswith("Optimizer."))
    step_us = sum(e.cpu_time_total for e in events if e.name == "overhead_step")
    blocked_us = sum(e.cpu_time_total for e in events if e.name in SYNC_CALLS)
    sync()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for i in indices:
                one_step(i)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sync()
    sync_warnings = [w for w in caught if "called a synchronizing" in str(w.message)]
    syncs = len(sync_warnings)
    sites = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in sync_warnings})
    deferred = getattr(opt, "__dict__", {}).get("_deferred_results")
    waits_before = deferred.waits if deferred is not None else 0
    for i in indices:
        one_step(i)
    sync()
    deferred = getattr(opt, "__dict__", {}).get("_deferred_results")
    waits = (deferred.waits - waits_before) if deferred is not None else 0
    return {"kernel_ms": kernel_us / 1e3 / n, "host_ms": max(step_us - blocked_us, 0.0) / 1e3 / n,
            "blocked_ms": blocked_us / 1e3 / n, "syncs_per_step": syncs / n, "sync_sites": sites, "host_waits_per_step": waits / n,
            "profiled_steps": n}


def make_batches(shape: Tuple[int, ...], cfg: Config, device: torch.device) -> List[Tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(cfg.seed)
    return [
        tuple(t.to(device) for t in (
            torch.rand(cfg.batch_size, *shape, generator=g), torch.randint(0, 10, (cfg.batch_size,), generator=g),
            torch.rand(cfg.val_batch_size, *shape, generator=g),
            torch.randint(0, 10, (cfg.val_batch_size,), generator=g)))
        for _ in range(4)
    ]


def initialise_libraries(name: str, batch: Tuple[torch.Tensor, ...], precisions: Sequence[str],
                         device: torch.device) -> None:
    """One forward and backward per precision before anything is measured: cuBLAS and cuDNN allocate
    their handles and workspaces on first use and keep them, which would otherwise count in the memory
    of whichever variant runs first."""
    model, _ = build(name)
    model.to(device).train()
    for precision in precisions:
        with common.autocast(device, precision == "bf16"):
            loss = model(batch[0]).float().logsumexp(dim=1).mean()
        loss.backward()
    torch.cuda.synchronize(device)


def median_pass(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The pass with the median ms (the lower middle one for an even count), with every pass's ms."""
    timed = [run for run in runs if "ms" in run]
    if len(timed) <= 1:
        return runs[0]
    row = dict(sorted(timed, key=lambda run: run["ms"])[(len(timed) - 1) // 2])
    row["ms_passes"] = [run["ms"] for run in timed]
    return row


def compare(rows: Dict[str, Dict[str, Any]]) -> None:
    """Add each row's ratios to its plain baseline (same setting) and to its eager twin."""
    for row in rows.values():
        if "ms" not in row:
            continue
        precision, compiled = row["precision"], row["compiled"]
        base_key = row_key(baseline_of(row["variant"]), precision, compiled)
        base = rows.get(base_key, {})
        if "ms" in base:
            row["baseline"] = base_key
            row["ratio_to_baseline"] = row["ms"] / base["ms"]
        if "kernel_ms" in row:
            row["gpu_busy"] = row["kernel_ms"] / row["ms"]
            if "kernel_ms" in base:
                row["kernel_ratio"] = row["kernel_ms"] / base["kernel_ms"]
                row["wall_over_kernel_ratio"] = row["ratio_to_baseline"] / row["kernel_ratio"]
        if "peak_x_params" in row and "peak_x_params" in base:
            row["extra_peak_x_params"] = row["peak_x_params"] - base["peak_x_params"]
            row["peak_extra_mb_vs_baseline"] = row["peak_total_mb"] - base["peak_total_mb"]
            if row["variant"] not in PLAIN:
                row["goal_x_params"] = row["tangents"] + 2
                row["meets_goal"] = row["extra_peak_x_params"] <= row["goal_x_params"]
        eager = rows.get(row_key(row["variant"], precision, False), {})
        if compiled and "ms" in eager:
            row["ratio_to_eager"] = row["ms"] / eager["ms"]


COLUMNS = [("variant", "variant", "s"), ("setting", "setting", "s"), ("ms", "ms/step", ".2f"),
           ("ratio_to_baseline", "x base", ".2f"), ("kernel_ratio", "x kernels", ".2f"),
           ("gpu_busy", "GPU busy", ".2f"), ("host_ms", "host ms", ".2f"), ("syncs_per_step", "syncs", ".1f"),
           ("host_waits_per_step", "waits", ".2f"), ("ratio_to_eager", "x eager", ".2f"),
           ("state_x_params", "state/params", ".2f"), ("tangents", "K", "d"),
           ("peak_x_params", "peak/params", ".2f"), ("extra_peak_x_params", "extra/params", ".2f"),
           ("goal_x_params", "K+2", "d"), ("recompiles_timed", "recompiles", "d"), ("warmup_s", "warmup s", ".1f"),
           ("note", "note", "s")]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = common.parse_config(argv, Config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = common.environment(device)
    settings = [(p, c) for p in cfg.precisions for c in dict.fromkeys(cfg.compiled)]
    results: Dict[str, Any] = {}
    recompile_log = RecompileLog()
    for name in cfg.models:
        model, shape = build(name)
        n_layers = len(ohotorch.layerwise(model))
        batches = make_batches(shape, cfg, device)
        if device.type == "cuda":
            initialise_libraries(name, batches[0], cfg.precisions, device)
        passes: Dict[str, List[Dict[str, Any]]] = {}
        for _ in range(cfg.repeats):  # interleaved: every variant once per pass
            for precision, compiled in settings:
                for variant in cfg.variants:
                    key = row_key(variant, precision, compiled)
                    spec = common.parse_method(variant)
                    layer_exact = spec.oho and spec.groups == "layer" and spec.influence == "exact"
                    if layer_exact and 2 * n_layers > cfg.exact_layer_max_tangents:
                        passes[key] = [{"variant": variant, "precision": precision, "compiled": compiled,
                                        "skipped": f"{2 * n_layers} tangents > exact_layer_max_tangents"}]
                        continue
                    if compiled:
                        with recompile_log:
                            seen = len(recompile_log.messages)
                            row = time_variant(variant, name, cfg, device, batches, precision, compiled)
                            row["recompile_reasons"] = [m[:500] for m in recompile_log.messages[seen:][:3]]
                    else:
                        row = time_variant(variant, name, cfg, device, batches, precision, compiled)
                    passes.setdefault(key, []).append(row)
        rows = {key: median_pass(runs) for key, runs in passes.items()}
        compare(rows)
        params_mb = param_bytes(model) / 2**20
        results[name] = {"layers": n_layers, "params_mb": params_mb, "variants": rows}
        print(f"\n{name} ({n_layers} layers, {params_mb:.1f} MB of parameters), batch {cfg.batch_size}, "
              f"device {device}")
        table = [dict(row, setting=setting_name(row["precision"], row["compiled"]), note=row.get("skipped"))
                 for row in rows.values()]
        print(common.format_table(table, COLUMNS))
    payload = {"kind": "overhead", "config": cfg.__dict__, "environment": env,
               "backends": {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                            "cudnn_tf32": torch.backends.cudnn.allow_tf32},
               "results": results}
    path = Path(cfg.out) if cfg.out else common.RESULTS_DIR / "overhead" / f"overhead_{device.type}{cfg.suffix()}.json"
    common.write_results(payload, path)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
