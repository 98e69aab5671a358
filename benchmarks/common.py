"""Shared machinery of the ohotorch benchmarks: configuration, data iteration, the training loop, records.

The task scripts (digits.py, mnist.py, cifar10_resnet18.py) only describe their data and models; every
method - the OHO variants and the paper's five baselines - runs through :func:`run_method` here, so a
comparison differs between methods only in the optimizer. search.py and robustness.py reuse the same
loop on any of the tasks through :func:`load_task`.

Benchmarks sit outside the package and use only ohotorch's public API (``OHO``, ``layerwise``,
``grouped``, ``cycle``).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

BASELINES: Tuple[str, ...] = ("sgd", "adam", "step", "exp", "cosine")
OHO_METHODS: Tuple[str, ...] = ("oho_global", "oho_layer_blockwise", "oho_layer_exact")
EXTRA_METHODS: Tuple[str, ...] = ("oho_grouped_blockwise", "oho_grouped_exact")
ALL_METHODS: Tuple[str, ...] = BASELINES + OHO_METHODS + EXTRA_METHODS
HYPER_NAMES: Tuple[str, ...] = ("lr", "weight_decay", "momentum")

# The tasks that search.py and robustness.py can run, by the name given on the command line.
TASK_MODULES: Dict[str, str] = {"digits": "digits", "mnist": "mnist", "cifar10": "cifar10_resnet18",
                                "cifar10_resnet18": "cifar10_resnet18"}


# ---------------------------------------------------------------------------------------------------
# Configuration: dataclasses with --key value overrides
# ---------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Options shared by every task; a task's config subclasses this and adds its data and model.

    Methods: sgd (fixed lr), adam, step (StepLR), exp (ExponentialLR), cosine (CosineAnnealingLR),
    oho_global, oho_layer_blockwise, oho_layer_exact, oho_grouped_blockwise, oho_grouped_exact.
    All SGD-family methods start from ``lr``/``weight_decay``/``momentum``; Adam from ``adam_lr``.
    Schedulers step once per epoch. ``0`` means "derive it" where a comment says so.
    """

    methods: Tuple[str, ...] = BASELINES + OHO_METHODS
    epochs: int = 10
    batch_size: int = 100
    val_batch_size: int = 100  # the validation minibatch of each OHO hyper-step
    eval_batch_size: int = 1000
    steps_per_epoch: int = 0  # 0: one full pass over the training split
    eval_batches: int = 0  # 0: evaluate on whole splits
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    # inner optimizer (initial values for OHO)
    lr: float = 0.1
    weight_decay: float = 1e-4
    momentum: float = 0.0
    nesterov: bool = False
    adam_lr: float = 1e-3
    # baseline schedules
    step_size: int = 0  # StepLR period in epochs; 0: epochs // 3
    step_gamma: float = 0.1
    exp_gamma: float = 0.0  # ExponentialLR factor per epoch; 0: reach exp_final_ratio at the end
    exp_final_ratio: float = 0.01
    # OHO
    tune: Tuple[str, ...] = ("lr", "weight_decay")
    meta_lr: Optional[float] = None  # None: ohotorch's default
    meta_optimizer: str = "adam"
    space: str = "log"
    hvp: str = "forward"
    hyper_every: int = 1
    n_groups: int = 4  # for oho_grouped_*
    oho_options: Tuple[str, ...] = ()  # further OHO keyword arguments, key=value (Python literals)
    # a sudden change of one hyperparameter at the start of an epoch (the paper's Fig. 6)
    reset_epoch: int = 0  # 0: never
    reset_name: str = "lr"
    reset_value: float = 0.0
    # runtime
    seed: int = 0
    seeds: int = 1  # comparisons repeat every method with seeds seed, seed + 1, ..., seed + seeds - 1
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int = 0  # torch CPU threads; 0: torch's default
    bf16: bool = False  # bfloat16 autocast for forward passes
    tf32: bool = False  # TF32 matmul/conv on CUDA (off: full fp32 for finite-difference HVPs)
    log_every: int = 0  # steps between trace records and progress updates; 0: ~300 records per run
    progress: bool = True
    results_dir: str = ""  # default: benchmarks/results/<task>
    out: str = ""  # explicit results file (overrides results_dir)
    quick: bool = False

    PRESETS: typing.ClassVar[Dict[str, Dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {ALL_METHODS}")
        for name in self.tune:
            if name not in HYPER_NAMES:
                raise ValueError(f"Unknown hyperparameter in tune: {name!r}; choose from {HYPER_NAMES}")
        if self.reset_epoch and self.reset_name not in HYPER_NAMES:
            raise ValueError(f"Invalid reset_name: {self.reset_name!r}")
        for name in ("epochs", "batch_size", "val_batch_size", "eval_batch_size", "hyper_every", "eval_every",
                     "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")


def _field_types(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(text: str, kind: Any, key: str) -> Any:
    """Parse one command-line string into ``kind`` (bool, int, float, str, Optional[...], Tuple[...])."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]
        if text.lower() in ("none", "null"):
            return None
        return _convert(text, next(a for a in args if a is not type(None)), key)
    if origin in (tuple, Tuple):
        items = [t.strip() for t in text.split(",") if t.strip()]
        return tuple(_convert(t, args[0] if args else str, key) for t in items)
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}: expected true/false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key}: cannot read {text!r} as {kind.__name__}") from None


def _tokenise(argv: Sequence[str], bool_keys: set) -> Tuple[Dict[str, str], List[str]]:
    """Split argv into {key: text} (``--key value``, ``--key=value``, bare ``--flag`` for bools) and
    positional arguments. Dashes in keys read as underscores (``--data-dir`` is ``data_dir``)."""
    values: Dict[str, str] = {}
    positional: List[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            positional.append(token)
            i += 1
            continue
        key, eq, text = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            following = argv[i + 1] if i + 1 < len(argv) else None
            if key in bool_keys and (following is None or following.startswith("--")
                                     or following.lower() not in ("1", "0", "true", "false", "yes", "no",
                                                                  "on", "off")):
                text = "true"
            elif following is None:
                raise ValueError(f"--{key} needs a value")
            else:
                text = following
                i += 1
        values[key] = text
        i += 1
    return values, positional


def config_help(*classes: type) -> str:
    """A usage text listing every option with its type and default."""
    lines = ["options (--key value; bools as --flag true/false; tuples as comma lists):"]
    seen = set()
    for cls in classes:
        defaults = cls()
        for name, kind in _field_types(cls).items():
            if name in seen:
                continue
            seen.add(name)
            value = getattr(defaults, name)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            kind_name = kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")
            lines.append(f"  --{name.replace('_', '-'):24s} {kind_name:22s} default: {shown}")
    return "\n".join(lines)


def parse_config(argv: Optional[Sequence[str]], *classes: type, positional: Optional[str] = None) -> Any:
    """Build one instance of each config dataclass from ``--key value`` overrides.

    A key sets that field in every class that has it (so ``--seed`` reaches both a search config and
    its task config); a key no class has is an error. When a bool field that names an entry of a class's
    ``PRESETS`` is set (``--quick``), the preset's values are applied first and explicit options override
    them. ``positional`` names a tuple field that collects bare arguments. Returns one instance, or a
    tuple of instances when several classes are given. ``--help`` prints the options and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(config_help(*classes))
        raise SystemExit(0)
    types = [_field_types(cls) for cls in classes]
    bool_keys = {k for t in types for k, v in t.items() if v is bool}
    values, bare = _tokenise(argv, bool_keys)
    if bare and positional is None:
        raise ValueError(f"Unexpected positional arguments: {bare}")
    known = {k for t in types for k in t}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown option(s): {', '.join('--' + k for k in unknown)}\n{config_help(*classes)}")

    instances = []
    for cls, kinds in zip(classes, types):
        own = {k: _convert(v, kinds[k], k) for k, v in values.items() if k in kinds}
        if positional is not None and positional in kinds and bare:
            own[positional] = tuple(own.get(positional, ())) + tuple(bare)
        merged: Dict[str, Any] = {}
        for flag, preset in getattr(cls, "PRESETS", {}).items():
            if own.get(flag):
                merged.update(preset)
        merged.update(own)
        instances.append(cls(**merged))
    return instances[0] if len(instances) == 1 else tuple(instances)


def peek_option(argv: Optional[Sequence[str]], key: str, default: str) -> str:
    """The raw value of ``--key`` in argv (before the full parse, to pick a task's config class)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values, _ = _tokenise([a for a in argv if a not in ("-h", "--help")], set())
    return values.get(key, default)


def parse_options(items: Sequence[str]) -> Dict[str, Any]:
    """``("discount=0.99", "reset_every=100")`` -> ``{"discount": 0.99, "reset_every": 100}``."""
    import ast

    options: Dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"Expected key=value, got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = text.strip()
    return options


# ---------------------------------------------------------------------------------------------------
# Runtime: seeds, devices, environment
# ---------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so every method starts from the same state."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return device


def setup_runtime(cfg: TrainConfig) -> torch.device:
    """Apply thread count and CUDA backend flags; return the device."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    return device


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        module = sys.modules.get(name)
        return getattr(module, "__version__", None) if module is not None else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git_revision() -> Dict[str, Any]:
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _source_digest(module: Any) -> Optional[Dict[str, str]]:
    """Where ohotorch was imported from and a SHA-256 of its sources: the exact code a run used, also
    when the checkout is dirty or changes while a long benchmark runs."""
    if module is None or not getattr(module, "__file__", None):
        return None
    root = Path(module.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return {"path": str(root), "sha256": digest.hexdigest()}


def environment(device: torch.device) -> Dict[str, Any]:
    """Library versions, device and host facts written into every results file. Call it when a run
    starts: the git state and source digest then describe the code that ran."""
    ohotorch = import_ohotorch(required=False)
    versions = {name: _package_version(name) for name in ("torch", "torchvision", "numpy", "scikit-learn",
                                                           "optuna", "tqdm")}
    versions["ohotorch"] = getattr(ohotorch, "__version__", None) or _package_version("ohotorch")
    versions["python"] = platform.python_version()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = torch.backends.cudnn.version()
    else:
        device_name = _cpu_name()
    return {
        "versions": versions,
        "device": str(device),
        "device_name": device_name,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git": _git_revision(),
        "ohotorch_source": _source_digest(ohotorch),
        "argv": sys.argv,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def import_ohotorch(required: bool = True) -> Any:
    """Import ohotorch; when running from a checkout that is not installed, use the checkout's copy."""
    try:
        return importlib.import_module("ohotorch")
    except ImportError:
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(1, str(REPO_ROOT))
            try:
                return importlib.import_module("ohotorch")
            except ImportError:
                pass
        if required:
            raise
        return None


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
class TensorLoader:
    """Minibatches of tensors that already live on the device, reshuffled at every pass.

    The small datasets (digits, MNIST) fit in memory, where a DataLoader's per-sample collation would
    cost more than the model. ``generator`` is public so that :meth:`Data.reseed` can give every method
    the same batch order.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 drop_last: bool = False) -> None:
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = torch.Generator()

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.y.device)
        else:
            order = None
        for k in range(len(self)):
            lo, hi = k * self.batch_size, min((k + 1) * self.batch_size, n)
            if order is None:
                yield self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                yield self.x[idx], self.y[idx]


@dataclass
class Data:
    """A task's splits as loaders.

    ``train`` yields shuffled (augmented, where the task augments) training batches; ``val`` yields
    shuffled validation batches, the only data OHO's hypergradients see; ``evals`` maps a split name to a
    fixed-order loader used for reporting (test is only ever reported, never tuned on).
    """

    train: Iterable
    val: Iterable
    evals: Dict[str, Iterable]
    num_classes: int
    synthetic: bool = False
    info: Dict[str, Any] = field(default_factory=dict)

    def reseed(self, seed: int) -> None:
        """Reset the shuffling generators so that every method sees the same batch order."""
        for offset, loader in enumerate((self.train, self.val)):
            generator = getattr(loader, "generator", None)
            if generator is not None:
                generator.manual_seed(seed * 1000 + offset)


def split_indices(n: int, sizes: Sequence[int], seed: int) -> List[torch.Tensor]:
    """Disjoint random index sets of the given sizes (the rest of ``n`` goes unused)."""
    if sum(sizes) > n:
        raise ValueError(f"Split sizes {list(sizes)} exceed the {n} available examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = np.cumsum([0, *sizes])
    return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def tensor_data(splits: Dict[str, Tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig, device: torch.device,
                num_classes: int, synthetic: bool = False, info: Optional[Dict[str, Any]] = None) -> Data:
    """:class:`Data` over in-memory ``{"train"|"val"|"test": (x, y)}`` tensors moved to ``device``."""
    on_device = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}
    sizes = {k: len(y) for k, (_, y) in on_device.items()}
    return Data(
        train=TensorLoader(*on_device["train"], cfg.batch_size, shuffle=True, drop_last=True),
        val=TensorLoader(*on_device["val"], cfg.val_batch_size, shuffle=True, drop_last=True),
        evals={k: TensorLoader(x, y, cfg.eval_batch_size, shuffle=False) for k, (x, y) in on_device.items()},
        num_classes=num_classes,
        synthetic=synthetic,
        info={"sizes": sizes, **(info or {})},
    )


def synthetic_images(n: int, shape: Sequence[int], num_classes: int, seed: int, noise: float = 0.35,
                     as_uint8: bool = False, chunk: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (or 0..255 bytes) with a learnable class signal, for ``--synthetic`` runs.

    Each class has a smooth random prototype (an upsampled 4x4 random pattern); an example is its class
    prototype plus pixel noise, clipped. Classes overlap, so losses fall over several epochs instead of
    reaching zero at once. Generated ``chunk`` examples at a time to bound memory.
    """
    g = torch.Generator().manual_seed(seed)
    channels, height, width = shape
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    prototypes = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    labels = torch.randint(num_classes, (n,), generator=g)
    images = torch.empty(n, channels, height, width, dtype=torch.uint8 if as_uint8 else torch.float32)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        block = prototypes[labels[lo:hi]] * 0.5 + 0.25
        block += noise * torch.randn(hi - lo, channels, height, width, generator=g)
        block.clamp_(0.0, 1.0)
        images[lo:hi] = (block * 255).round() if as_uint8 else block
    return images, labels


# ---------------------------------------------------------------------------------------------------
# Models shared by the small tasks
# ---------------------------------------------------------------------------------------------------
def mlp(in_features: int, width: int, depth: int, num_classes: int) -> nn.Sequential:
    """``depth`` linear layers (depth - 1 hidden layers of ``width`` units, ReLU) on flattened input."""
    if depth < 1:
        raise ValueError(f"Invalid depth: {depth}")
    layers: List[nn.Module] = [nn.Flatten()]
    features = in_features
    for _ in range(depth - 1):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int, image_size: int, width: int, num_classes: int) -> nn.Sequential:
    """Four layers: two 3x3 conv + ReLU + 2x2 max-pool blocks (width, 2 * width channels), a hidden
    fully connected layer of 4 * width units and the classifier."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    )


# ---------------------------------------------------------------------------------------------------
# Optimizers for every method
# ---------------------------------------------------------------------------------------------------
def has_buffers(model: nn.Module) -> bool:
    """Whether the model carries buffers (BatchNorm statistics) that OHO must restore exactly."""
    return any(True for _ in model.buffers())


def build_oho(method: str, model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """ohotorch.OHO for an ``oho_*`` method: the granularity picks the param groups, the suffix the
    influence mode (global has one group, where blockwise and exact coincide)."""
    ohotorch = import_ohotorch()
    granularity, _, influence = method[len("oho_"):].partition("_")
    if granularity == "global":
        params: Any = model.parameters()
        influence = "exact"
    elif granularity == "layer":
        params = ohotorch.layerwise(model)
    elif granularity == "grouped":
        params = ohotorch.grouped(model, cfg.n_groups)
    else:
        raise ValueError(f"Unknown OHO method: {method}")
    return ohotorch.OHO(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        tune=cfg.tune, meta_lr=cfg.meta_lr, meta_optimizer=cfg.meta_optimizer, space=cfg.space,
        influence=influence, hvp=cfg.hvp, module=model if has_buffers(model) else None,
        **parse_options(cfg.oho_options),
    )


def build_optimizer(method: str, model: nn.Module, cfg: TrainConfig) -> Tuple[torch.optim.Optimizer, Any]:
    """The optimizer and (for the decay baselines) the per-epoch lr scheduler of ``method``."""
    if method.startswith("oho_"):
        return build_oho(method, model, cfg), None
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.adam_lr, weight_decay=cfg.weight_decay), None
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler
    if method == "sgd":
        return sgd, None
    if method == "step":
        return sgd, sched.StepLR(sgd, step_size=cfg.step_size or max(1, cfg.epochs // 3), gamma=cfg.step_gamma)
    if method == "exp":
        gamma = cfg.exp_gamma or cfg.exp_final_ratio ** (1.0 / cfg.epochs)
        return sgd, sched.ExponentialLR(sgd, gamma=gamma)
    if method == "cosine":
        return sgd, sched.CosineAnnealingLR(sgd, T_max=cfg.epochs)
    raise ValueError(f"Unknown method: {method}")


def group_names(opt: torch.optim.Optimizer, model: nn.Module) -> List[str]:
    """A readable name per param group: its ``name`` key, else the module owning its first parameter."""
    owner = {id(p): name.rpartition(".")[0] or name for name, p in model.named_parameters()}
    names = []
    for i, group in enumerate(opt.param_groups):
        if "name" in group:
            names.append(str(group["name"]))
        elif len(opt.param_groups) == 1:
            names.append("all")
        else:
            names.append(owner.get(id(group["params"][0]), str(i)))
    return names


def hyperparameters(opt: torch.optim.Optimizer) -> Dict[str, List[float]]:
    """The current lr / weight decay / momentum of every param group (the tuned state is public)."""
    values: Dict[str, List[float]] = {}
    for name in HYPER_NAMES:
        if all(name in g for g in opt.param_groups):
            values[name] = [_round(float(g[name])) for g in opt.param_groups]
    return values


# ---------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------
def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def to_device(batch: Sequence[torch.Tensor], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def make_closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device, bf16: bool) -> Callable[[], torch.Tensor]:
    """The LBFGS-style closure every optimizer here takes: clear grads, loss on one batch, backward."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with autocast(device, bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, bf16: bool = False,
             max_batches: int = 0) -> Dict[str, float]:
    """Mean cross-entropy and accuracy over a split, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for k, batch in enumerate(loader):
        if max_batches and k >= max_batches:
            break
        x, y = to_device(batch, device)
        with autocast(device, bf16):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    model.train(was_training)
    loss = float(loss_sum) / max(count, 1)
    return {"loss": _round(loss), "acc": _round(float(correct) / max(count, 1))}


def evaluate_splits(model: nn.Module, data: Data, device: torch.device,
                    cfg: TrainConfig) -> Dict[str, Dict[str, float]]:
    """:func:`evaluate` on every reporting split of ``data``."""
    return {split: evaluate(model, loader, device, cfg.bf16, cfg.eval_batches) for split, loader in data.evals.items()}


def _summarise_values(values: List[float]) -> str:
    """One number for a progress bar: the value, or the geometric mean over several groups."""
    positive = [v for v in values if v > 0]
    if len(values) == 1 or not positive:
        return f"{values[0]:.3g}"
    return f"~{math.exp(sum(math.log(v) for v in positive) / len(positive)):.3g}"


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Recorder:
    """Per-epoch curves and a finer per-step trace of hyperparameters, hypergradients and loss."""

    def __init__(self, traced: Sequence[str]) -> None:
        self.traced = tuple(traced)  # hyperparameters worth a per-step trace (the others are in the curves)
        self.curves: Dict[str, Any] = {"epoch": [], "wall_time": [], "train_loss_running": []}
        self.trace: Dict[str, Any] = {"step": [], "epoch": [], "train_loss": [], "hypergradient": {}}

    def epoch(self, epoch: int, wall: float, running: Optional[float], metrics: Dict[str, Dict[str, float]],
              hypers: Dict[str, List[float]]) -> None:
        self.curves["epoch"].append(epoch)
        self.curves["wall_time"].append(_round(wall))
        self.curves["train_loss_running"].append(None if running is None else _round(running))
        for split, values in metrics.items():
            for key, value in values.items():
                self.curves.setdefault(f"{split}_{key}", []).append(value)
        for name, per_group in hypers.items():
            self.curves.setdefault(name, []).append(per_group)

    def step(self, step: int, epoch: float, loss: float, hypers: Dict[str, List[float]],
             hypergrads: Optional[List[Dict[str, torch.Tensor]]], influence: Optional[Dict[str, float]]) -> None:
        self.trace["step"].append(step)
        self.trace["epoch"].append(_round(epoch, 4))
        self.trace["train_loss"].append(_round(loss))
        for name, per_group in hypers.items():
            if name in self.traced:
                self.trace.setdefault(name, []).append(per_group)
        if hypergrads is not None:
            for name in HYPER_NAMES:
                per_group = [float(h[name]) if name in h else None for h in hypergrads]
                if any(v is not None for v in per_group):
                    values = [None if v is None else _round(v) for v in per_group]
                    self.trace["hypergradient"].setdefault(name, []).append(values)
        if influence:  # OHO's diagnostics: the norm of each tangent (column of the influence matrix)
            norms = self.trace.setdefault("influence_norm", {})
            for key, value in influence.items():
                norms.setdefault(key, []).append(_round(float(value)))


def run_method(method: str, model_fn: Callable[[], nn.Module], data: Data, cfg: TrainConfig) -> Dict[str, Any]:
    """Train one model with one method and record everything a results file needs.

    Every method starts from the same seed, initial weights and batch order. OHO methods take one
    hyper-step (on the next validation batch) every ``hyper_every`` steps. The split losses are
    evaluated before training and after every ``eval_every`` epochs; the wall time counts training only.
    A run whose training loss becomes non-finite stops and is marked ``diverged``.
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data.reseed(cfg.seed)
    model = model_fn().to(device)
    opt, scheduler = build_optimizer(method, model, cfg)
    is_oho = method.startswith("oho_")
    val_batches = import_ohotorch().cycle(data.val) if is_oho else None

    steps_per_epoch = min(len(data.train), cfg.steps_per_epoch or len(data.train))
    log_every = cfg.log_every or max(1, cfg.epochs * steps_per_epoch // 300)
    recorder = Recorder(("lr", "weight_decay") + (("momentum",) if "momentum" in cfg.tune else ()))
    recorder.epoch(0, 0.0, None, evaluate_splits(model, data, device, cfg), hyperparameters(opt))

    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=method, leave=False, disable=not cfg.progress,
               dynamic_ncols=True)
    step, wall, diverged = 0, 0.0, False
    last_hyper = None
    for epoch in range(1, cfg.epochs + 1):
        if cfg.reset_epoch == epoch:
            for group in opt.param_groups:
                group[cfg.reset_name] = cfg.reset_value
        model.train()
        _synchronise(device)
        start = time.perf_counter()
        epoch_loss = torch.zeros((), device=device, dtype=torch.float64)
        window_loss = torch.zeros((), device=device, dtype=torch.float64)
        window = 0
        for k, batch in enumerate(data.train):
            if k >= steps_per_epoch:
                break
            x, y = to_device(batch, device)
            loss = opt.step(make_closure(model, opt, x, y, device, cfg.bf16))
            if is_oho and step % cfg.hyper_every == 0:
                xv, yv = to_device(next(val_batches), device)
                last_hyper = opt.hyper_step(make_closure(model, opt, xv, yv, device, cfg.bf16))
            step += 1
            epoch_loss += loss.detach().double()
            window_loss += loss.detach().double()
            window += 1
            if step % log_every == 0 or k == steps_per_epoch - 1:
                mean = float(window_loss) / window
                hypers = hyperparameters(opt)
                influence = getattr(opt, "diagnostics", {}).get("influence_norm") if is_oho else None
                recorder.step(step, step / steps_per_epoch, mean, hypers, last_hyper, influence)
                bar.set_postfix_str(_postfix(hypers, mean, recorder.curves), refresh=False)
                bar.update(window)
                window_loss.zero_()
                window = 0
                if not math.isfinite(mean):
                    diverged = True
                    break
        if scheduler is not None:
            scheduler.step()
        _synchronise(device)
        wall += time.perf_counter() - start
        running = float(epoch_loss) / max(k + 1, 1)
        diverged = diverged or not math.isfinite(running)
        last = epoch == cfg.epochs or diverged
        if epoch % cfg.eval_every == 0 or last:
            recorder.epoch(epoch, wall, running, evaluate_splits(model, data, device, cfg), hyperparameters(opt))
        if diverged:
            break
    bar.close()
    result = {
        "method": method,
        "groups": group_names(opt, model),
        "curves": recorder.curves,
        "trace": recorder.trace,
        "final": final_figures(recorder.curves, wall, step, diverged),
    }
    if is_oho and hasattr(opt, "counters"):
        result["oho_counters"] = dict(opt.counters)
    if cfg.progress:
        tqdm.write(_result_line(f"{method} (seed {cfg.seed})", result["final"]))
    return result


def _postfix(hypers: Dict[str, List[float]], loss: float, curves: Dict[str, Any]) -> str:
    parts = [f"lr={_summarise_values(hypers['lr'])}"]
    if "weight_decay" in hypers:
        parts.append(f"wd={_summarise_values(hypers['weight_decay'])}")
    parts.append(f"loss={loss:.4f}")
    if curves.get("val_loss"):
        parts.append(f"val={curves['val_loss'][-1]:.4f}")
    return " ".join(parts)


def final_figures(curves: Dict[str, Any], wall: float, steps: int, diverged: bool) -> Dict[str, Any]:
    """The numbers a summary reports: last-epoch losses and accuracies, the test loss at the epoch of
    best validation loss, final hyperparameters, training wall time."""
    final: Dict[str, Any] = {"epochs": curves["epoch"][-1], "steps": steps, "wall_time_s": _round(wall),
                             "diverged": diverged}
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
        if curves.get(key):
            value = curves[key][-1]
            final[key] = value if (value is not None and math.isfinite(value) and not diverged) else None
    val = [v if v is not None and math.isfinite(v) else math.inf for v in curves.get("val_loss", [])]
    if val and "test_loss" in curves:
        best = int(np.argmin(val))
        final["best_val_epoch"] = curves["epoch"][best]
        final["test_loss_at_best_val"] = curves["test_loss"][best]
    for name in HYPER_NAMES:
        if curves.get(name):
            final[name] = curves[name][-1]
    return final


def _result_line(method: str, final: Dict[str, Any]) -> str:
    if final["diverged"]:
        return f"{method}: diverged after {final['steps']} steps"
    return (f"{method}: test loss {final.get('test_loss', float('nan')):.4f}  "
            f"test acc {final.get('test_acc', float('nan')):.4f}  ({final['wall_time_s']:.1f} s)")


# ---------------------------------------------------------------------------------------------------
# Tasks, comparisons and results files
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """What a task script provides: its config class, its data and its model."""

    name: str
    config: type
    load_data: Callable[[Any, torch.device], Data]
    build_model: Callable[[Any, Data], nn.Module]

    def tag(self, cfg: Any) -> str:
        """The model's name, used in results file names."""
        return str(getattr(cfg, "model", "model"))

    def model_fn(self, cfg: Any, data: Data) -> Callable[[], nn.Module]:
        return lambda: self.build_model(cfg, data)


def load_task(name: str) -> Task:
    """The :class:`Task` of a task script, by its command-line name (digits, mnist, cifar10)."""
    if name not in TASK_MODULES:
        raise ValueError(f"Unknown task {name!r}; choose from {sorted(TASK_MODULES)}")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(TASK_MODULES[name]).TASK


@dataclass
class Session:
    """What search.py and robustness.py work with: their own config, a task, its config and its data."""

    cfg: Any
    task: Task
    task_cfg: Any
    device: torch.device
    data: Data
    env: Dict[str, Any]

    @property
    def model_fn(self) -> Callable[[], nn.Module]:
        return self.task.model_fn(self.task_cfg, self.data)

    def header(self, kind: str) -> Dict[str, Any]:
        payload = payload_header(kind, self.task.name, {kind: self.cfg, "task": self.task_cfg}, self.device,
                                 self.data.synthetic, self.env)
        payload["data"] = self.data.info
        return payload

    def path(self, kind: str) -> Path:
        return results_path(self.task_cfg, self.task.name, kind, self.task.tag(self.task_cfg), self.data.synthetic)


def open_session(cls: type, argv: Optional[Sequence[str]]) -> Session:
    """Parse ``cls`` (which has a ``task`` field) together with that task's config, and load the data.

    Options are shared: ``--epochs 20`` reaches the task config, ``--trials 10`` the script's own.
    """
    task = load_task(peek_option(argv, "task", cls().task))
    cfg, task_cfg = parse_config(argv, cls, task.config)
    device = setup_runtime(task_cfg)
    env = environment(device)
    return Session(cfg, task, task_cfg, device, task.load_data(task_cfg, device), env)


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


def compare_main(task: Task, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """A task script's entry point: run every configured method, write the results file, print a table."""
    cfg = parse_config(argv, task.config)
    device = setup_runtime(cfg)
    env = environment(device)
    start = time.perf_counter()
    data = task.load_data(cfg, device)
    model_fn = task.model_fn(cfg, data)
    seeds = [cfg.seed + k for k in range(cfg.seeds)]
    results = {method: [run_method(method, model_fn, data, dataclasses.replace(cfg, seed=seed)) for seed in seeds]
               for method in cfg.methods}
    payload = payload_header("compare", task.name, {"task": cfg}, device, data.synthetic, env)
    payload["data"] = data.info
    payload["total_wall_time_s"] = _round(time.perf_counter() - start)
    payload["summary"] = summary_rows(results)
    payload["methods"] = results  # method -> one run per seed
    path = write_results(payload, results_path(cfg, task.name, "compare", task.tag(cfg), data.synthetic))
    label = " (synthetic data)" if data.synthetic else ""
    seed_text = f"seed {cfg.seed}" if cfg.seeds == 1 else f"seeds {seeds[0]}-{seeds[-1]} (mean, std)"
    print(f"\n{task.name} / {task.tag(cfg)}{label}: {cfg.epochs} epochs, {seed_text}, "
          f"{payload['environment']['device_name']}")
    print(format_table(payload["summary"], SUMMARY_COLUMNS))
    print(f"results: {path}  ({payload['total_wall_time_s']:.0f} s in all)")
    payload["path"] = str(path)
    return payload
