"""Configuration: dataclass configs with ``--key value`` overrides."""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .optimizers import ALL_METHODS, BASELINES, HYPER_NAMES, OHO_METHODS


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
