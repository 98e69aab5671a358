"""How close do hypergradients computed under bf16 autocast come to float32 ones?

Under ``torch.autocast(dtype=torch.bfloat16)`` the parameters, tangents and optimizer state stay float32,
but every gradient OHO reads (training, finite-difference and validation) carries bf16 rounding, 8 bits
of mantissa. Two things can go wrong: the gradients themselves (the greedy hypergradient
``<grad L_val(w_{t+1}), -u_t>`` is a dot product of two bf16 gradients), and the finite-difference
Hessian-vector products of the full horizon, whose rounding error grows like ``u / eps``. With
``compute_dtype=torch.bfloat16`` OHO sizes the finite-difference step for bf16 (relative 0.01,
``ohotorch.finite_differences.LOW_PRECISION_STEP``, chosen from this script's H100 run, where the
``bf16`` row still used the classical ``sqrt(2^-7) = 0.088``) instead of float32's ``3.5e-4``.

**Design.** For each model (``overhead.build``: the MLP on MNIST-shaped inputs, with ReLU and with GELU (no kinks for the
finite differences to cross), ResNet18 on CIFAR-shaped
ones, fed :func:`common.synthetic_images`, which carry a learnable class signal), from one
initialisation and with the same batches: ``presteps`` plain float32 SGD steps leave the
initialisation; from there every setting runs global OHO (momentum 0.9, weight decay 5e-4, tuning lr and
weight decay, ``meta_lr=0`` so the hyperparameters stay fixed and all settings stay comparable) for
``steps`` steps, and the hypergradient ``opt.hypergradient(val_closure)`` is read after every step, for
the greedy horizon (``discount=0``, no HVP) and the full one (``discount=1``). The settings:

* ``fp32``: the reference;
* ``bf16``: bf16 autocast closures, ``compute_dtype=torch.bfloat16`` (the recommended use);
* ``bf16, fp32 step``: bf16 autocast with the float32-sized step (``compute_dtype`` left out): why the
  step matters (full horizon only; the greedy horizon has no finite differences);
* ``fp32, bf16 step``: float32 closures with the bf16-sized step: the truncation error of the larger
  step alone, without bf16 rounding (full horizon only);
* ``bf16, fd_rel r``: bf16 autocast with other steps (``fd_rels``; full horizon only);
* ``fp64`` (``fp64_models``, the two MLPs by default): the float64 run, whose distance to ``fp32`` is the
  noise floor of the float32 reference itself.

Three comparisons, each against ``fp32``:

* **trajectory**: each setting runs its own T steps. End to end, but the weights drift apart (chaotic
  training amplifies rounding), so it mixes precision error with trajectory divergence; ``drift`` is
  ``||w_T - w_T(fp32)|| / ||w_T(fp32) - w_0||``.
* **same state, validation**: at every step of the fp32 run, the hypergradient at that very state
  (weights and fp32 tangents) with a bf16 (or fp64) validation closure: the error of the validation
  gradient alone (one row per precision; the finite-difference step plays no part).
* **same state, one step**: at every step of the fp32 run, copy the state before the step (the model
  by ``copy.deepcopy``, the optimizer by ``load_state_dict`` into a fresh OHO built with the
  setting's options), advance one step with the setting's closures and read the hypergradient with
  its validation closure. On the full horizon this isolates what one step of bf16 training gradient
  and bf16 finite-difference HVP does to the influence; ``tangent err`` is the relative error of the
  tangents themselves, ``||w'_{t+1} - w'_{t+1}(fp32)|| / ||w'_{t+1}(fp32)||``.

Per setting and tuned name: the median over the T steps of the relative error
``|h - h_fp32| / |h_fp32|``, the fraction of steps where the signs agree (the meta-update of Adam on
log-hyperparameters mostly follows the sign), and the cosine between the two sequences of
hypergradients. The results file holds every sequence.

    python benchmarks/bf16_accuracy.py                      # CUDA: both models, ~1.5 minutes on an H100
    python benchmarks/bf16_accuracy.py --quick              # CPU smoke run: MLP, 3 steps
"""
from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import common
from overhead import build


TUNE = ("lr", "weight_decay")  # in OHO's canonical order: tangent j belongs to TUNE[j]
HORIZONS = {"greedy": 0.0, "full": 1.0}


@dataclass(frozen=True)
class Setting:
    """How a run computes: the parameters' dtype, autocast, and OHO's finite-difference options."""

    name: str
    dtype: torch.dtype = torch.float32
    bf16: bool = False  # closures under torch.autocast(dtype=torch.bfloat16)
    compute_dtype: Optional[torch.dtype] = None
    fd_rel: Optional[float] = None


REFERENCE = Setting("fp32")


@dataclass
class Config:
    models: Tuple[str, ...] = ("mlp", "mlp_gelu", "resnet18")
    horizons: Tuple[str, ...] = ("greedy", "full")
    steps: int = 50  # T: OHO steps, a hypergradient after each
    presteps: int = 20  # plain float32 SGD steps first, to leave the initialisation
    batch_size: int = 128
    val_batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    hvp: str = "forward"
    fd_rels: Tuple[float, ...] = (0.03, 0.088, 0.3)  # bf16 steps swept on the full horizon (default 0.01)
    fp64_models: Tuple[str, ...] = ("mlp", "mlp_gelu")  # models that also run in float64 (the noise floor of fp32)
    same_state: bool = True  # the same-state comparisons
    pool: int = 16  # distinct (train, validation) batch pairs, cycled
    tf32: bool = False  # TF32 matmul/conv on CUDA: off, so that fp32 means float32
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    out: str = ""  # default: benchmarks/results/bf16/bf16_<device>[_quick].json
    quick: bool = False

    PRESETS: typing.ClassVar[Dict[str, Dict[str, Any]]] = {
        "quick": {"models": ("mlp",), "steps": 3, "presteps": 2, "batch_size": 16, "val_batch_size": 16,
                  "fd_rels": (0.03,), "pool": 4},
    }

    def __post_init__(self) -> None:
        unknown = [h for h in self.horizons if h not in HORIZONS]
        if unknown:
            raise ValueError(f"Unknown horizon(s) {unknown}; choose from {tuple(HORIZONS)}")
        for name in ("steps", "batch_size", "val_batch_size", "pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        if any(not (r > 0 and math.isfinite(r)) for r in self.fd_rels):
            raise ValueError(f"Invalid fd_rels: {self.fd_rels}")


def settings_for(model: str, horizon: str, cfg: Config) -> List[Setting]:
    """The settings compared with the fp32 reference (which is not in the list)."""
    settings = [Setting("bf16", bf16=True, compute_dtype=torch.bfloat16)]
    if horizon == "full":  # the finite-difference step only matters where there are HVPs
        settings += [Setting("bf16, fp32 step", bf16=True),
                     Setting("fp32, bf16 step", compute_dtype=torch.bfloat16)]
        settings += [Setting(f"bf16, fd_rel {r:g}", bf16=True, fd_rel=r) for r in cfg.fd_rels]
    if model in cfg.fp64_models:
        settings.append(Setting("fp64", dtype=torch.float64))
    return settings


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------
class Batches:
    """``pool`` (x, y, x_val, y_val) batches on the device, cycled, cast on demand to a setting's dtype."""

    def __init__(self, shape: Tuple[int, ...], cfg: Config, device: torch.device) -> None:
        n = cfg.pool * (cfg.batch_size + cfg.val_batch_size)
        x, y = common.synthetic_images(n, shape, 10, seed=cfg.seed)
        x, y = x.to(device), y.to(device)
        sizes = [cfg.batch_size, cfg.val_batch_size] * cfg.pool
        parts = list(zip(torch.split(x, sizes), torch.split(y, sizes)))
        self.pairs = [(*parts[2 * k], *parts[2 * k + 1]) for k in range(cfg.pool)]

    def __call__(self, step: int, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, ...]:
        x, y, xv, yv = self.pairs[step % len(self.pairs)]
        return x.to(dtype), y, xv.to(dtype), yv


def closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            setting: Setting, device: torch.device) -> Callable[[], torch.Tensor]:
    return common.make_closure(model, opt, x, y, device, setting.bf16)


def make_oho(model: nn.Module, setting: Setting, discount: float, cfg: Config) -> torch.optim.Optimizer:
    """Global OHO with the hyperparameters frozen (meta_lr 0), through the benchmarks' one factory."""
    method = {0.0: "oho_global_greedy", 1.0: "oho_global_full"}.get(discount, f"oho_global_discount{discount}")
    settings = common.OptimizerSettings(
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, tune=TUNE, meta_lr=0.0, hvp=cfg.hvp,
        compute_dtype=setting.compute_dtype,
        oho_options=() if setting.fd_rel is None else (f"fd_rel={setting.fd_rel!r}",))
    return common.build_optimizer(method, model, settings)[0]


def clone(model: nn.Module, opt_state: Dict[str, Any], setting: Setting, discount: float,
          cfg: Config) -> Tuple[nn.Module, torch.optim.Optimizer]:
    """A copy of ``model`` in the setting's dtype with a fresh OHO (the setting's options) that continues
    from ``opt_state``; nothing is shared with the original."""
    twin = copy.deepcopy(model).to(setting.dtype)
    opt = make_oho(twin, setting, discount, cfg)
    state = copy.deepcopy(opt_state)
    for entry in state["state"].values():  # OHO keeps tangents in the precision they were saved in
        for key, value in entry.items():
            if key.startswith("tangent_") and torch.is_tensor(value):
                entry[key] = value.to(setting.dtype)
    opt.load_state_dict(state)
    return twin, opt


def hypergradient(model: nn.Module, opt: torch.optim.Optimizer, xv: torch.Tensor, yv: torch.Tensor,
                  setting: Setting, device: torch.device) -> Dict[str, float]:
    (group,) = opt.hypergradient(closure(model, opt, xv, yv, setting, device))
    return {name: float(group[name]) for name in TUNE}


def tangents(opt: torch.optim.Optimizer, model: nn.Module) -> List[torch.Tensor]:
    """The influence, one flat float64 vector per tuned name (OHO keeps it in ``state[p]["tangent_w"]``)."""
    flat = [opt.state[p]["tangent_w"].reshape(len(TUNE), -1).double() for p in model.parameters()]
    return list(torch.cat(flat, dim=1))


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def presteps(model: nn.Module, batches: Batches, cfg: Config, device: torch.device) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for t in range(cfg.presteps):
        x, y, _, _ = batches(t)
        closure(model, opt, x, y, REFERENCE, device)()
        opt.step()


def run(start: nn.Module, setting: Setting, horizon: str, batches: Batches, cfg: Config, device: torch.device,
        probes: Sequence[Setting] = ()) -> Dict[str, Any]:
    """``steps`` OHO steps from ``start`` in ``setting``, the hypergradient after each.

    With ``probes`` (the reference run), also the same-state comparisons of every probe setting at
    every step: its validation closure at this run's state, and one step of its own from this run's
    state before the step.
    """
    discount = HORIZONS[horizon]
    model = copy.deepcopy(start).to(setting.dtype)
    opt = make_oho(model, setting, discount, cfg)
    sequence: Dict[str, List[float]] = {name: [] for name in TUNE}
    # The validation probe depends on the precision only: one per precision other than this run's.
    first: Dict[Tuple[torch.dtype, bool], Setting] = {}
    for p in probes:
        first.setdefault((p.dtype, p.bf16), p)
    val_probes = [p for key, p in first.items() if key != (setting.dtype, setting.bf16)]
    val_probe = {p.name: {name: [] for name in TUNE} for p in val_probes}
    step_probe = {p.name: {name: [] for name in TUNE} for p in probes}
    tangent_err = {p.name: {name: [] for name in TUNE} for p in probes}
    for t in range(cfg.steps):
        index = cfg.presteps + t
        x, y, xv, yv = batches(index, setting.dtype)
        before = (copy.deepcopy(model), copy.deepcopy(opt.state_dict())) if probes else None
        opt.step(closure(model, opt, x, y, setting, device))
        h = hypergradient(model, opt, xv, yv, setting, device)
        for name in TUNE:
            sequence[name].append(h[name])
        if not probes:
            continue
        for probe in val_probes:
            _, _, pxv, pyv = batches(index, probe.dtype)
            if probe.dtype == setting.dtype:
                h_val = hypergradient(model, opt, pxv, pyv, probe, device)
            else:
                twin, twin_opt = clone(model, opt.state_dict(), probe, discount, cfg)
                h_val = hypergradient(twin, twin_opt, pxv, pyv, probe, device)
            for name in TUNE:
                val_probe[probe.name][name].append(h_val[name])
        reference_tangents = tangents(opt, model)
        for probe in probes:
            px, py, pxv, pyv = batches(index, probe.dtype)
            twin, twin_opt = clone(*before, probe, discount, cfg)
            twin_opt.step(closure(twin, twin_opt, px, py, probe, device))
            h_step = hypergradient(twin, twin_opt, pxv, pyv, probe, device)
            for name, own, ref in zip(TUNE, tangents(twin_opt, twin), reference_tangents):
                step_probe[probe.name][name].append(h_step[name])
                err = torch.linalg.vector_norm(own - ref) / torch.linalg.vector_norm(ref)
                tangent_err[probe.name][name].append(float(err))
            del twin, twin_opt
    if any(opt.param_groups[0][name] != getattr(cfg, name) for name in TUNE):
        raise RuntimeError("meta_lr=0 must leave the hyperparameters unchanged")
    out: Dict[str, Any] = {"hypergradients": sequence, "final_weights": flat_weights(model)}
    if probes:
        out["same_state_val"] = val_probe
        out["same_state_step"] = step_probe
        out["tangent_rel_err"] = tangent_err
    return out


# ---------------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------------
def agreement(values: Sequence[float], reference: Sequence[float]) -> Dict[str, Optional[float]]:
    """Median and maximum relative error, sign agreement, cosine and norm-wise relative error of one
    sequence of hypergradients against the reference sequence."""
    rel = [abs(a - r) / max(abs(r), 1e-30) for a, r in zip(values, reference)]
    dot = sum(a * r for a, r in zip(values, reference))
    norm_a = math.sqrt(sum(a * a for a in values))
    norm_r = math.sqrt(sum(r * r for r in reference))
    diff = math.sqrt(sum((a - r) ** 2 for a, r in zip(values, reference)))
    finite = all(math.isfinite(v) for v in values)
    return {
        "median_rel_err": statistics.median(rel) if finite else None,
        "max_rel_err": max(rel) if finite else None,
        "sign_agreement": sum((a > 0) == (r > 0) for a, r in zip(values, reference)) / len(reference),
        "cosine": dot / (norm_a * norm_r) if finite and norm_a > 0 and norm_r > 0 else None,
        "norm_rel_err": diff / norm_r if finite and norm_r > 0 else None,
    }


def compare_model(name: str, cfg: Config, device: torch.device) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    common.seed_everything(cfg.seed)
    model, shape = build(name)
    model.to(device).train()
    batches = Batches(shape, cfg, device)
    presteps(model, batches, cfg, device)
    start_weights = flat_weights(model)
    results: Dict[str, Any] = {}
    rows: List[Dict[str, Any]] = []
    for horizon in cfg.horizons:
        t0 = time.perf_counter()
        settings = settings_for(name, horizon, cfg)
        reference = run(model, REFERENCE, horizon, batches, cfg, device, probes=settings if cfg.same_state else ())
        ref_seq, ref_weights = reference["hypergradients"], reference["final_weights"]
        moved = float(torch.linalg.vector_norm(ref_weights - start_weights))
        block: Dict[str, Any] = {"reference": {"hypergradients": ref_seq, "weight_distance_moved": moved},
                                 "trajectory": {}, "same_state_val": {}, "same_state_step": {}}

        def record(comparison: str, setting: Setting, seq: Dict[str, List[float]], **extra: Any) -> None:
            metrics = {n: agreement(seq[n], ref_seq[n]) for n in TUNE}
            block[comparison][setting.name] = {"hypergradients": seq, "metrics": metrics, **extra}
            row = {"model": name, "horizon": horizon, "comparison": comparison, "setting": setting.name}
            for n, short in zip(TUNE, ("lr", "wd")):
                row[f"err_{short}"] = metrics[n]["median_rel_err"]
                row[f"sign_{short}"] = metrics[n]["sign_agreement"]
                row[f"cos_{short}"] = metrics[n]["cosine"]
                if "tangent_rel_err" in extra:
                    row[f"tangent_{short}"] = statistics.median(extra["tangent_rel_err"][n])
            row["drift"] = extra.get("weight_drift")
            rows.append(row)

        for setting in settings:
            other = run(model, setting, horizon, batches, cfg, device)
            drift = float(torch.linalg.vector_norm(other["final_weights"] - ref_weights)) / max(moved, 1e-30)
            record("trajectory", setting, other["hypergradients"], weight_drift=drift)
        if cfg.same_state:
            for setting in settings:
                if setting.name in reference["same_state_val"]:
                    record("same_state_val", setting, reference["same_state_val"][setting.name])
            for setting in settings:
                record("same_state_step", setting, reference["same_state_step"][setting.name],
                       tangent_rel_err=reference["tangent_rel_err"][setting.name])
        block["seconds"] = time.perf_counter() - t0
        results[horizon] = block
        print(f"  {name}, {horizon} horizon: {len(settings) + 1} settings x {cfg.steps} steps in "
              f"{block['seconds']:.1f} s", flush=True)
    return results, rows


COLUMNS = [("model", "model", "s"), ("horizon", "horizon", "s"), ("comparison", "comparison", "s"),
           ("setting", "setting", "s"), ("err_lr", "rel.err lr", ".1e"), ("err_wd", "rel.err wd", ".1e"),
           ("sign_lr", "sign lr", ".2f"), ("sign_wd", "sign wd", ".2f"), ("cos_lr", "cos lr", ".4f"),
           ("cos_wd", "cos wd", ".4f"), ("tangent_lr", "tangent err lr", ".1e"),
           ("tangent_wd", "tangent err wd", ".1e"), ("drift", "drift", ".1e")]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = common.parse_config(argv, Config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    env = common.environment(device)
    results: Dict[str, Any] = {}
    rows: List[Dict[str, Any]] = []
    for name in cfg.models:
        results[name], model_rows = compare_model(name, cfg, device)
        rows += model_rows
    payload = {"kind": "bf16_accuracy", "config": dataclasses.asdict(cfg), "environment": env,
               "backends": {"matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
                            "cudnn_tf32": torch.backends.cudnn.allow_tf32},
               "results": results, "summary": rows}
    print("\nmedian over the steps of |h - h_fp32| / |h_fp32|; sign agreement; cosine of the sequences; "
          "tangent error after one step from the same state; weight drift of the trajectories")
    print(common.format_table(rows, COLUMNS))
    tag = device.type + ("_quick" if cfg.quick else "")
    path = Path(cfg.out) if cfg.out else common.RESULTS_DIR / "bf16" / f"bf16_{tag}.json"
    common.write_results(payload, path)
    print(f"\nwrote {path}")
    return payload


if __name__ == "__main__":
    main()
