"""The optimizer's own host (Python) time per step, measured on the CPU, as a predictor of the GPU's.

On a GPU the device idles while Python runs; ``benchmarks/overhead.py`` measures that on the device.
This script measures the same host work on the CPU, where it is cheap to run: a model with ResNet18's
62 parameter tensors and 60 BatchNorm buffers (``resnet18_narrow``: the CIFAR ResNet18 layout at
``width`` channels in the first stage instead of 64, so that every kernel is tiny) on a tiny input
(default 8 x 3 x 8 x 8). The CUDA code path ("sync-free": no host reads, device meta-update, deferred
read-back) is forced on the CPU tensors with ``opt._sync_free = True`` (``--sync-free false`` measures
the CPU's host path instead), and so are the multi-tensor (``torch._foreach_*``) path that every
optimizer takes on CUDA (``--foreach false``: the per-tensor loops) and the multi-tensor contraction of
the hypergradients (``--multi-tensor-contraction false``: one ``torch.mv`` per parameter, the CPU's form).
The CPU runs a multi-tensor op tensor by tensor, so ``host_ms`` overstates what such ops cost a GPU's
host (one to a few launches each); ``ops`` and ``cuda_launches`` below are the counts to compare.

For each variant it reports, per step (an ``_h10`` variant: per step averaged over whole cycles of 10):

* ``step_ms``: the wall time of ``step()`` + ``hyper_step()`` (plain variants: the closure + ``step()``);
* ``closure_ms``: the time spent inside the closures (timed separately around every call);
* ``host_ms = step_ms - closure_ms``: the optimizer's own time, which on a GPU is host time the device
  waits through unless its queue is long;
* ``ops``: the aten operators the optimizer dispatches outside the closures (a
  ``TorchDispatchMode`` count, one per ``torch._foreach_*`` call), and ``cuda_launches``: the kernels
  they would launch on CUDA (none for views, ``empty``, ``set_`` and other metadata ops; one per tensor
  for a multi-tensor op over lists that mix dtypes or devices, which CUDA runs tensor by tensor); every
  launch costs ~5-10 us of host time on CUDA;
* with ``--profile true``, the top functions by self time (cProfile) of one more block of steps.

    python benchmarks/host_time.py                         # every variant, results JSON
    python benchmarks/host_time.py --variants oho_greedy --profile true
"""
from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import common

ohotorch = common.import_ohotorch()

VARIANTS = ("sgd", "oho_greedy", "oho_global_full", "oho_global_full_h10", "adam", "oho_adam_full")
PLAIN = ("sgd", "adam", "adamw")
# aten ops that launch no kernel on a GPU (metadata, allocation, aliasing)
NO_KERNEL = {"view", "_unsafe_view", "empty", "empty_like", "empty_strided", "set_", "detach", "alias",
             "as_strided", "t", "expand", "reshape", "slice", "select", "unsqueeze", "squeeze", "lift_fresh",
             "_to_copy_noop", "is_same_size", "view_as_real", "unbind", "split", "_reshape_alias",
             "resolve_conj", "resolve_neg", "_local_scalar_dense"}


@dataclass
class Config:
    variants: Tuple[str, ...] = VARIANTS
    model: str = "resnet18_narrow"  # resnet18_narrow (62 tensors, tiny) or resnet18 (torchvision, full width)
    width: int = 4  # resnet18_narrow: channels of the first stage (64 in ResNet18)
    batch_size: int = 8  # 2 makes the full horizon diverge on this model (reset steps change the work)
    image_size: int = 8
    iters: int = 20  # timed steps per pass and variant (h10: rounded up to whole cycles)
    warmup: int = 4
    repeats: int = 3  # interleaved passes over the variants; each row reports the median pass
    momentum: float = 0.9
    sync_free: bool = True  # force the CUDA (sync-free) path on the CPU tensors
    foreach: bool = True  # the torch._foreach_* path, every optimizer's default on CUDA
    multi_tensor_contraction: bool = True  # the hypergradient contraction's form on CUDA
    profile: bool = False  # cProfile one more block of steps per variant
    profile_top: int = 25
    threads: int = 1
    seed: int = 0
    label: str = ""  # what code was measured (e.g. a commit), written into the results
    out: str = ""  # default: benchmarks/results/overhead/host_time_cpu.json


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


def narrow_resnet18(width: int, num_classes: int = 10) -> nn.Module:
    """The CIFAR ResNet18 (3x3 stem, no max-pool) with ``width, 2 width, 4 width, 8 width`` channels: the
    same 62 parameter tensors and 60 buffers as torchvision's, in the same order."""
    layers: List[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    inplanes = width
    for stage, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        stride = 1 if stage == 0 else 2
        layers += [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1)]
        inplanes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes)]
    return nn.Sequential(*layers)


def build(cfg: Config) -> nn.Module:
    if cfg.model == "resnet18_narrow":
        return narrow_resnet18(cfg.width)
    if cfg.model == "resnet18":
        import overhead
        return overhead.build("resnet18")[0]
    raise ValueError(f"Unknown model {cfg.model!r}")


def make_optimizer(variant: str, model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """``benchmarks/overhead.py``'s optimizer of ``variant`` (lr 0.01 SGD family with momentum, 1e-3 Adam)."""
    adam = "adam" in variant
    settings = common.OptimizerSettings(lr=0.01, adam_lr=1e-3, momentum=None if adam else cfg.momentum)
    opt, _ = common.build_optimizer(variant, model, settings)
    if variant in PLAIN:
        for group in opt.param_groups:  # torch.optim's default on CUDA
            group["foreach"] = cfg.foreach
    else:
        opt._sync_free = cfg.sync_free
        opt.foreach = cfg.foreach
        opt._multi_tensor_contraction = cfg.multi_tensor_contraction
    return opt


def cuda_launches(name: str, args: Sequence[Any]) -> int:
    """The kernels an op would launch on CUDA: none for a metadata op, one per tensor for a multi-tensor
    (``_foreach_*``) op whose lists mix dtypes or devices (CUDA's per-tensor fallback), else one."""
    if name in NO_KERNEL:
        return 0
    if not name.startswith("_foreach_"):
        return 1
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    tensors = [t for a in lists for t in a]
    if not tensors:
        return 1
    kinds = {(t.dtype, t.device) for t in tensors}
    return 1 if len(kinds) == 1 else len(lists[0])


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, and the CUDA kernels they would launch, while ``counting`` is true."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = True
        self.ops: Counter = Counter()
        self.launches = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.counting:
            name = func.overloadpacket.__name__
            self.ops[name] += 1
            self.launches += cuda_launches(name, args)
        return func(*args, **(kwargs or {}))


class Runner:
    """One variant's model, optimizer, batches and timed closures."""

    def __init__(self, variant: str, cfg: Config) -> None:
        common.seed_everything(cfg.seed)
        self.variant, self.cfg = variant, cfg
        self.model = build(cfg).train()
        self.opt = make_optimizer(variant, self.model, cfg)
        self.every = (common.parse_method(variant).hyper_every or 1) if variant not in PLAIN else 1
        g = torch.Generator().manual_seed(cfg.seed)
        shape = (cfg.batch_size, 3, cfg.image_size, cfg.image_size)
        self.batches = [(torch.randn(shape, generator=g), torch.randint(0, 10, (cfg.batch_size,), generator=g))
                        for _ in range(4)]
        self.closure_s = 0.0
        self.counter: Optional[OpCounter] = None
        self.index = 0

    def closure_for(self, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        model, opt = self.model, self.opt

        def closure() -> torch.Tensor:
            counter = self.counter
            if counter is not None:
                counter.counting = False
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            self.closure_s += time.perf_counter() - t0
            if counter is not None:
                counter.counting = True
            return loss

        return closure

    def one_step(self) -> None:
        i = self.index
        self.index += 1
        x, y = self.batches[i % 2]
        xv, yv = self.batches[2 + i % 2]
        closure = self.closure_for(x, y)
        if self.variant in PLAIN:
            closure()
            self.opt.step()
            return
        self.opt.step(closure)
        if (i + 1) % self.every == 0:
            self.opt.hyper_step(self.closure_for(xv, yv))

    def block(self, steps: int) -> Tuple[float, float]:
        """(wall ms, closure ms) per step over ``steps`` steps."""
        self.closure_s = 0.0
        t0 = time.perf_counter()
        for _ in range(steps):
            self.one_step()
        wall = time.perf_counter() - t0
        return 1e3 * wall / steps, 1e3 * self.closure_s / steps

    def aligned(self, steps: int) -> int:
        """``steps`` rounded up to whole hyper-step cycles; first advances to a cycle's start."""
        while self.index % self.every:
            self.one_step()
        return -(-steps // self.every) * self.every

    def count_ops(self) -> Tuple[Counter, int, int]:
        steps = self.aligned(self.every)
        counter = self.counter = OpCounter()
        with counter:
            for _ in range(steps):
                self.one_step()
        self.counter = None
        return counter.ops, counter.launches, steps


def measure(runner: Runner, cfg: Config) -> Dict[str, Any]:
    steps = runner.aligned(cfg.iters)
    step_ms, closure_ms = runner.block(steps)
    return {"step_ms": step_ms, "closure_ms": closure_ms, "host_ms": step_ms - closure_ms, "steps": steps}


def profile(runner: Runner, cfg: Config) -> List[Dict[str, Any]]:
    steps = runner.aligned(cfg.iters)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        runner.one_step()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, line, name), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(filename).name}:{line}({name})", "calls_per_step": nc / steps,
                     "self_ms_per_step": 1e3 * tt / steps, "cum_ms_per_step": 1e3 * ct / steps})
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    return rows[:cfg.profile_top]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = common.parse_config(argv, Config)
    torch.set_num_threads(cfg.threads)
    env = common.environment(torch.device("cpu"))
    runners = {variant: Runner(variant, cfg) for variant in cfg.variants}
    for runner in runners.values():
        for _ in range(cfg.warmup):
            runner.one_step()
    passes: Dict[str, List[Dict[str, Any]]] = {v: [] for v in cfg.variants}
    for _ in range(cfg.repeats):
        for variant, runner in runners.items():
            passes[variant].append(measure(runner, cfg))
    rows: Dict[str, Dict[str, Any]] = {}
    for variant, runner in runners.items():
        runs = passes[variant]
        row = {key: statistics.median(r[key] for r in runs) for key in ("step_ms", "closure_ms", "host_ms")}
        row["host_ms_passes"] = [r["host_ms"] for r in runs]
        ops, launches, steps = runner.count_ops()
        row["ops"] = sum(ops.values()) / steps
        row["cuda_launches"] = launches / steps
        row["ops_by_name"] = {name: n / steps for name, n in ops.most_common()}
        if cfg.profile:
            row["profile"] = profile(runner, cfg)
        rows[variant] = row
    print(f"{cfg.model} (width {cfg.width}), batch {cfg.batch_size}x3x{cfg.image_size}x{cfg.image_size}, "
          f"sync_free={cfg.sync_free}, {cfg.threads} thread(s), {env['device_name']}")
    print(common.format_table([dict(r, variant=v) for v, r in rows.items()],
                              [("variant", "variant", "s"), ("step_ms", "step ms", ".2f"),
                               ("closure_ms", "closure ms", ".2f"), ("host_ms", "host ms", ".2f"),
                               ("ops", "ops", ".0f"), ("cuda_launches", "CUDA launches", ".0f")]))
    if cfg.profile:
        for variant, row in rows.items():
            print(f"\n{variant}: top self time per step")
            for r in row["profile"]:
                print(f"  {r['self_ms_per_step']:7.3f} ms {r['calls_per_step']:7.1f} calls  {r['function']}")
    payload = {"kind": "host_time", "config": cfg.__dict__, "environment": env,
               "parameters": len(list(next(iter(runners.values())).model.parameters())), "results": rows}
    path = Path(cfg.out) if cfg.out else common.RESULTS_DIR / "overhead" / "host_time_cpu.json"
    common.write_results(payload, path)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
