"""Configuration: dataclass configs with ``--key value`` overrides."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .optimizers import BASELINES, HYPER_NAMES, OHO_METHODS, is_method


@dataclass
class TrainConfig:
    """Options shared by every task; a task's config subclasses this and adds its data and model.

    Methods: sgd (fixed lr), adam, adamw, step (StepLR), exp (ExponentialLR), cosine (CosineAnnealingLR),
    and OHO by name: oho_global, oho_layer_blockwise, oho_layer_exact, oho_grouped_blockwise,
    oho_grouped_exact (greedy horizon), with _full or _discount<g> for longer horizons, oho_adam_* and
    oho_adamw_* for OHOAdam / OHOAdamW (the grammar: ``common.optimizers``).
    All SGD-family methods start from ``lr``/``weight_decay``/``momentum``; the Adam family from ``adam_lr``.
    Schedulers step once per epoch. ``0`` means "derive it" where a comment says so.
    """

    methods: Tuple[str, ...] = BASELINES + OHO_METHODS  # the methods to compare, in order
    epochs: int = 10  # training epochs per run
    batch_size: int = 100  # the training minibatch
    val_batch_size: int = 100  # the validation minibatch of each OHO hyper-step
    eval_batch_size: int = 1000  # minibatch for evaluating whole splits
    steps_per_epoch: int = 0  # 0: one full pass over the training split
    eval_batches: int = 0  # 0: evaluate on whole splits
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    # inner optimizer (initial values for OHO)
    lr: float = 0.1  # SGD-family (and OHO's initial) learning rate
    weight_decay: float = 1e-4  # (initial) weight decay of every method
    momentum: float = 0.0  # SGD-family momentum
    nesterov: bool = False  # Nesterov momentum for the SGD family
    adam_lr: float = 1e-3  # (initial) learning rate of adam, adamw, oho_adam*, oho_adamw*
    # baseline schedules
    step_size: int = 0  # StepLR period in epochs; 0: epochs // 3
    step_gamma: float = 0.1  # StepLR factor
    exp_gamma: float = 0.0  # ExponentialLR factor per epoch; 0: reach exp_final_ratio at the end
    exp_final_ratio: float = 0.01  # final lr / initial lr of exp when exp_gamma is 0
    # OHO
    tune: Tuple[str, ...] = ("lr", "weight_decay")  # the hyperparameters OHO tunes
    meta_lr: Optional[float] = None  # None: ohotorch's default
    meta_optimizer: str = "adam"  # OHO's meta-optimizer (adam or sgd)
    space: str = "log"  # OHO tunes hyperparameters in log or linear space
    hvp: str = "forward"  # OHO's finite-difference Hessian-vector products
    hyper_every: int = 1  # one OHO hyper-step every N steps (a method's _h<N> overrides it)
    n_groups: int = 4  # hyperparameter groups of the oho_*grouped* methods
    oho_options: Tuple[str, ...] = ()  # further OHO keyword arguments, key=value (Python literals)
    # a sudden change of one hyperparameter at the start of an epoch (the paper's Fig. 6)
    reset_epoch: int = 0  # 0: never
    reset_name: str = "lr"  # the hyperparameter reset_epoch sets
    reset_value: float = 0.0  # the value reset_epoch sets it to
    # runtime
    seed: int = 0  # the first seed (weights, batch order)
    seeds: int = 1  # comparisons repeat every method with seeds seed, seed + 1, ..., seed + seeds - 1
    device: str = "auto"  # auto: cuda when available, else cpu
    threads: int = 0  # torch CPU threads; 0: torch's default
    bf16: bool = False  # bfloat16 autocast for forward passes
    tf32: bool = False  # TF32 matmul/conv on CUDA (off: full fp32 for finite-difference HVPs)
    log_every: int = 0  # steps between trace records and progress updates; 0: ~300 records per run
    progress: bool = True  # progress bars and per-run result lines
    results_dir: str = ""  # default: benchmarks/results/<task>
    out: str = ""  # explicit results file (overrides results_dir)
    quick: bool = False  # the task's small preset (explicit options still win)

    PRESETS: typing.ClassVar[Dict[str, Dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if not is_method(m)]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {BASELINES + ('adamw',)} or an OHO "
                             "name: oho[_adam|_adamw][_global|_layer|_grouped][_blockwise|_exact]"
                             "[_greedy|_full|_discount<g>][_h<N>]")
        for name in self.tune:
            if name not in HYPER_NAMES:
                raise ValueError(f"Unknown hyperparameter in tune: {name!r}; choose from {HYPER_NAMES}")
        if self.reset_epoch and self.reset_name not in HYPER_NAMES:
            raise ValueError(f"Invalid reset_name: {self.reset_name!r}")
        for name in ("epochs", "batch_size", "val_batch_size", "eval_batch_size", "hyper_every", "eval_every",
                     "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")


# ---------------------------------------------------------------------------------------------------
# Command-line parsing: one argparse option per dataclass field
# ---------------------------------------------------------------------------------------------------
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


class ConfigError(ValueError):
    """A command line that does not fit the configs (unknown option, unreadable or invalid value)."""


def _field_types(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def field_help(cls: type) -> Dict[str, str]:
    """Each field's help text: its ``metadata["help"]``, else the comment after it in the class source
    (``epochs: int = 10  # passes over the training split``), also from the dataclasses it extends."""
    texts: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # defined where no source is kept (an interactive session)
            continue
        for line in source.splitlines():
            match = _COMMENT.match(line)
            if match:
                texts[match.group(1)] = match.group(2)
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            texts[f.name] = str(f.metadata["help"])
    return texts


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
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"--{key}: expected true/false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key}: cannot read {text!r} as {kind.__name__}") from None


def _kind_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        return _kind_name(next(a for a in args if a is not type(None))) + "|none"
    if origin in (tuple, Tuple):
        return (_kind_name(args[0]) if args else "str") + ",..."
    return getattr(kind, "__name__", str(kind))


def _checker(kind: Any, key: str) -> Callable[[str], str]:
    """An argparse ``type`` that rejects unreadable values at once and keeps the text: a key shared by
    several configs is converted for each of them."""

    def check(text: str) -> str:
        try:
            _convert(text, kind, key)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).partition(": ")[2] or str(error)) from None
        return text

    check.__name__ = _kind_name(kind)
    return check


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _description(cls: type) -> Optional[str]:
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(cls.__name__ + "("):  # dataclass's generated signature
        return None
    return inspect.cleandoc(doc)


def build_parser(*classes: type, positional: Optional[str] = None, prog: Optional[str] = None,
                 description: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one ``--key`` option per field of ``classes`` (a field several classes
    share appears once), each with its type, default and help text.

    Keys take dashes or underscores (``--data-dir``, ``--data_dir``), values follow as ``--key value`` or
    ``--key=value``; a bool field may be given bare (``--quick``) or as ``--quick true/false``; tuples are
    comma lists; ``none`` reads as None for optional fields. ``positional`` names a tuple field that
    collects bare arguments. Values are kept as text (see :func:`parse_config`).
    """
    parser = _Parser(
        prog=prog, usage="%(prog)s [--key value ...]" + (f" [{positional} ...]" if positional else ""),
        description=description if description is not None else _description(classes[0]),
        allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options take dashes or underscores; bools as a bare --flag or --flag true/false; tuples as "
               "comma lists; 'none' for optional values.")
    seen = set()
    for cls in classes:
        defaults, helps = cls(), field_help(cls)
        for name, kind in _field_types(cls).items():
            if name in seen:
                continue
            seen.add(name)
            value = getattr(defaults, name)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            text = helps.get(name, "")
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
            flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
            extra: Dict[str, Any] = {"nargs": "?", "const": "true"} if kind is bool else {}
            parser.add_argument(*flags, dest=name, type=_checker(kind, name), default=argparse.SUPPRESS,
                                metavar=_kind_name(kind).upper(), help=text.replace("%", "%%"), **extra)
    if positional is not None:
        parser.add_argument(positional, nargs="*", default=argparse.SUPPRESS,
                            help=_positional_help(classes, positional))
    return parser


def _positional_help(classes: Sequence[type], name: str) -> str:
    for cls in classes:
        text = field_help(cls).get(name)
        if text:
            return text
    return name


def _bare_flags(argv: List[str], bool_keys: set) -> List[str]:
    """``--flag`` followed by something that is not a bool value gets an explicit ``true`` (so that
    ``--quick results.json`` reads as quick=true and a positional argument)."""
    out: List[str] = []
    for i, token in enumerate(argv):
        out.append(token)
        if token.startswith("--") and "=" not in token and token[2:].replace("-", "_") in bool_keys:
            following = argv[i + 1] if i + 1 < len(argv) else None
            if following is not None and not following.startswith("-") and following.lower() not in _TRUE + _FALSE:
                out.append("true")
    return out


def config_help(*classes: type, positional: Optional[str] = None) -> str:
    """The usage text: every option with its type, default and help."""
    return build_parser(*classes, positional=positional).format_help()


def parse_config(argv: Optional[Sequence[str]], *classes: type, positional: Optional[str] = None) -> Any:
    """Build one instance of each config dataclass from ``--key value`` overrides (:func:`build_parser`).

    A key sets that field in every class that has it (so ``--seed`` reaches both a search config and
    its task config). When a bool field that names an entry of a class's ``PRESETS`` is set
    (``--quick``), the preset's values are applied first and explicit options override them. Returns
    one instance, or a tuple of instances when several classes are given. ``--help`` prints the options
    and exits. A bad command line raises :class:`ConfigError` (a ValueError) when ``argv`` is given, and
    prints the usage and exits with status 2 when it is read from ``sys.argv``.
    """
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(*classes, positional=positional)
    try:
        return _parse(parser, argv, classes, positional)
    except ValueError as error:
        if not from_sys:
            message = str(error)
            if message.startswith("unrecognized arguments"):
                message = "Unknown option(s): " + message.partition(": ")[2]
            raise ConfigError(message) from None
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _parse(parser: argparse.ArgumentParser, argv: List[str], classes: Sequence[type],
           positional: Optional[str]) -> Any:
    types = [_field_types(cls) for cls in classes]
    bool_keys = {k for t in types for k, v in t.items() if v is bool}
    argv = _bare_flags(argv, bool_keys)
    namespace = parser.parse_intermixed_args(argv) if positional else parser.parse_args(argv)
    values: Dict[str, Any] = dict(vars(namespace))
    bare = list(values.pop(positional, []) or []) if positional else []
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
    parser = _Parser(add_help=False, allow_abbrev=False)
    flags = ["--" + key.replace("_", "-")] + (["--" + key] if "_" in key else [])
    parser.add_argument(*flags, dest=key, default=default)
    namespace, _ = parser.parse_known_args(argv)
    return getattr(namespace, key)
