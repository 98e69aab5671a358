"""How many training runs, and how much wall-clock, do random search and Bayesian optimisation need to
match one OHO run? (The paper's Fig. 2.)

For every baseline (sgd, adam, step, exp, cosine) and every sampler (Optuna's RandomSampler and
TPESampler), trials draw (initial lr, weight decay) log-uniformly and train the task's model once each.
The sampler minimises the final validation loss (``--objective test_loss`` reproduces the paper's
optimistic accounting). After every trial the incumbent - the trial with the best objective so far - has
a test loss; "runs to target" is the first trial count at which that test loss reaches the target, and
"wall to target" the training wall time summed over those trials. The target defaults to the final
test loss of OHO's single run (``--oho-methods``), which is reported beside them.

    python benchmarks/search.py --task digits --trials 20
    python benchmarks/search.py --task mnist --epochs 20 --search-methods sgd,cosine --repeats 3
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

import common

PENALTY = 1e6  # objective of a diverged trial: worse than any finite loss, still usable by TPE


@dataclass
class SearchConfig:
    task: str = "digits"  # digits | mnist | cifar10
    search_methods: Tuple[str, ...] = common.BASELINES
    samplers: Tuple[str, ...] = ("random", "tpe")
    trials: int = 20
    repeats: int = 1  # independent searches per (method, sampler), with different sampler seeds
    lr_range: Tuple[float, ...] = (1e-3, 1.0)  # SGD-family initial lr, log-uniform
    adam_lr_range: Tuple[float, ...] = (1e-5, 1e-1)
    wd_range: Tuple[float, ...] = (1e-6, 1e-1)  # weight decay, log-uniform
    oho_methods: Tuple[str, ...] = ("oho_global",)
    target: float = 0.0  # test loss to reach; 0: final test loss of the first OHO method that did not diverge
    target_slack: float = 0.0  # accept target * (1 + slack)
    objective: str = "val_loss"  # val_loss | test_loss: what the samplers minimise
    tpe_startup: int = 5  # TPE's random start-up trials
    quick: bool = False

    PRESETS = {"quick": {"trials": 6, "samplers": ("random", "tpe"), "search_methods": ("sgd", "cosine")}}

    def __post_init__(self) -> None:
        for sampler in self.samplers:
            if sampler not in ("random", "tpe"):
                raise ValueError(f"Unknown sampler {sampler!r} (random or tpe)")
        for method in self.search_methods:
            if method not in common.BASELINES:
                raise ValueError(f"search_methods are baselines {common.BASELINES}, got {method!r}")
        for method in self.oho_methods:
            if not common.parse_method(method).oho:  # ValueError for an unknown name
                raise ValueError(f"oho_methods are OHO methods, got {method!r}")
        if self.objective not in ("val_loss", "test_loss"):
            raise ValueError(f"Unknown objective {self.objective!r}")
        for name in ("lr_range", "adam_lr_range", "wd_range"):
            low, high = getattr(self, name)
            if not 0 < low < high:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (need 0 < low < high)")


def _optuna() -> Any:
    """Import Optuna on first use (it is only needed here) and silence its per-trial logging."""
    try:
        import optuna
    except ImportError:
        raise SystemExit("search.py needs optuna: pip install optuna (or ohotorch[bench])") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def make_sampler(name: str, seed: int, startup: int) -> Any:
    """Optuna's RandomSampler or TPESampler (Bayesian optimisation with tree-structured Parzen estimators)."""
    samplers = _optuna().samplers
    if name == "tpe":
        return samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return samplers.RandomSampler(seed=seed)


def search_space(method: str, cfg: SearchConfig) -> Dict[str, Any]:
    """Log-uniform initial lr (Adam's own range for adam) and weight decay."""
    float_dist = _optuna().distributions.FloatDistribution
    lr_range = cfg.adam_lr_range if method == "adam" else cfg.lr_range
    return {"lr": float_dist(*lr_range, log=True), "weight_decay": float_dist(*cfg.wd_range, log=True)}


def run_trial(session: common.Session, method: str, lr: float, weight_decay: float) -> Dict[str, Any]:
    """Train once with the given initial hyperparameters (evaluating only before and after training).

    Every trial uses the task's seed: the same initial weights and batch order, only the hyperparameters
    differ, as in the OHO run they are compared with.
    """
    task_cfg = session.task_cfg
    lr_field = "adam_lr" if method == "adam" else "lr"
    run_cfg = dataclasses.replace(task_cfg, methods=(method,), progress=False, eval_every=task_cfg.epochs,
                                  weight_decay=weight_decay, **{lr_field: lr})
    start = time.perf_counter()
    result = common.run_method(method, session.model_fn, session.data, run_cfg)
    final = result["final"]
    return {"lr": lr, "weight_decay": weight_decay, "val_loss": final.get("val_loss"),
            "test_loss": final.get("test_loss"), "test_acc": final.get("test_acc"),
            "wall_time_s": final["wall_time_s"], "total_s": time.perf_counter() - start,
            "diverged": final["diverged"]}


def search(session: common.Session, method: str, sampler_name: str, repeat: int, bar: Any) -> List[Dict[str, Any]]:
    """One search: ``trials`` ask/train/tell rounds with a freshly seeded sampler."""
    cfg = session.cfg
    optuna = _optuna()
    seed = session.task_cfg.seed * 1000 + repeat
    study = optuna.create_study(direction="minimize", sampler=make_sampler(sampler_name, seed, cfg.tpe_startup))
    space = search_space(method, cfg)
    trials = []
    for index in range(cfg.trials):
        trial = study.ask(space)
        record = run_trial(session, method, trial.params["lr"], trial.params["weight_decay"])
        value = record[cfg.objective]
        study.tell(trial, PENALTY if value is None or not math.isfinite(value) else value)
        trials.append({"method": method, "sampler": sampler_name, "repeat": repeat, "trial": index, **record})
        best = min((t["test_loss"] for t in trials if t["test_loss"] is not None), default=float("nan"))
        bar.set_postfix_str(f"{method}/{sampler_name} lr={record['lr']:.2g} wd={record['weight_decay']:.2g} "
                            f"test={_fmt(record['test_loss'])} best={best:.4f}", refresh=False)
        bar.update()
    return trials


def _fmt(value: Optional[float]) -> str:
    return "diverged" if value is None else f"{value:.4f}"


def time_to_target(trials: Sequence[Dict[str, Any]], target: float, objective: str) -> Dict[str, Any]:
    """Runs and training wall time until the incumbent's test loss reaches ``target``.

    The incumbent after n trials is the one with the best objective among the first n (the model a
    practitioner would pick); ``oracle_*`` instead takes the best test loss seen, the optimistic count.
    """
    def reached(losses: Sequence[Optional[float]]) -> Optional[int]:
        return next((n for n, loss in enumerate(losses, 1) if loss is not None and loss <= target), None)

    incumbent, oracle = [], []
    best_objective, best_test, best_any = math.inf, None, math.inf
    for t in trials:
        value = t[objective] if t[objective] is not None else math.inf
        if value < best_objective:
            best_objective, best_test = value, t["test_loss"]
        incumbent.append(best_test)
        if t["test_loss"] is not None:
            best_any = min(best_any, t["test_loss"])
        oracle.append(best_any if math.isfinite(best_any) else None)
    walls = np.cumsum([t["wall_time_s"] for t in trials]).tolist()
    runs, oracle_runs = reached(incumbent), reached(oracle)
    return {
        "runs_to_target": runs,
        "wall_to_target_s": walls[runs - 1] if runs else None,
        "oracle_runs_to_target": oracle_runs,
        "oracle_wall_to_target_s": walls[oracle_runs - 1] if oracle_runs else None,
        "incumbent_test_loss": incumbent,
        "cumulative_wall_s": walls,
        "final_incumbent_test_loss": incumbent[-1] if incumbent else None,
        "total_wall_s": walls[-1] if walls else 0.0,
    }


def choose_target(cfg: SearchConfig, oho: Dict[str, Dict[str, Any]]) -> Tuple[float, str]:
    """The test loss to reach, and where it came from (``--target``, or an OHO run's final test loss)."""
    if cfg.target > 0:
        target, source = cfg.target, "--target"
    else:
        finished = [(name, r["final"]["test_loss"]) for name, r in oho.items()
                    if r["final"].get("test_loss") is not None]
        if not finished:
            raise SystemExit("No target: every OHO run diverged (or none ran); pass --target")
        source, target = finished[0]
    return target * (1.0 + cfg.target_slack), source


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    """Median where a search that never reached the target counts as infinitely long."""
    if not values:
        return None
    ordered = sorted(math.inf if v is None else v for v in values)
    middle = ordered[(len(ordered) - 1) // 2]
    return None if math.isinf(middle) else middle


def summarise(trials: List[Dict[str, Any]], cfg: SearchConfig, target: float) -> List[Dict[str, Any]]:
    """One row per (method, sampler): medians over repeats of runs and wall time to target."""
    rows = []
    for method in cfg.search_methods:
        for sampler in cfg.samplers:
            searches = []
            for repeat in range(cfg.repeats):
                own = [t for t in trials if (t["method"], t["sampler"], t["repeat"]) == (method, sampler, repeat)]
                searches.append(time_to_target(own, target, cfg.objective))
            rows.append({
                "method": f"{method}/{sampler}",
                "runs_to_target": _median([s["runs_to_target"] for s in searches]),
                "wall_to_target_s": _median([s["wall_to_target_s"] for s in searches]),
                "oracle_runs_to_target": _median([s["oracle_runs_to_target"] for s in searches]),
                "reached": f"{sum(s['runs_to_target'] is not None for s in searches)}/{len(searches)}",
                "best_test_loss": _median([s["final_incumbent_test_loss"] for s in searches]),
                "total_wall_s": _median([s["total_wall_s"] for s in searches]),
                "searches": searches,
            })
    return rows


COLUMNS = (("method", "method", ""), ("runs_to_target", "runs to target", ".0f"),
           ("wall_to_target_s", "wall to target s", ".1f"), ("oracle_runs_to_target", "oracle runs", ".0f"),
           ("reached", "reached", ""), ("best_test_loss", "incumbent test loss", ".4f"),
           ("total_wall_s", "search wall s", ".1f"))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    session = common.open_session(SearchConfig, argv)
    cfg, task_cfg = session.cfg, session.task_cfg
    start = time.perf_counter()

    oho = {m: common.run_method(m, session.model_fn, session.data, dataclasses.replace(task_cfg, methods=(m,)))
           for m in cfg.oho_methods}
    target, source = choose_target(cfg, oho)

    total = len(cfg.search_methods) * len(cfg.samplers) * cfg.repeats * cfg.trials
    trials: List[Dict[str, Any]] = []
    with tqdm(total=total, desc="search", disable=not task_cfg.progress, dynamic_ncols=True) as bar:
        for method in cfg.search_methods:
            for sampler in cfg.samplers:
                for repeat in range(cfg.repeats):
                    trials += search(session, method, sampler, repeat, bar)

    rows = summarise(trials, cfg, target)
    for name, result in oho.items():
        final = result["final"]
        reached = final.get("test_loss") is not None and final["test_loss"] <= target
        rows.append({"method": name, "runs_to_target": 1 if reached else None,
                     "wall_to_target_s": final["wall_time_s"] if reached else None,
                     "oracle_runs_to_target": 1 if reached else None, "reached": f"{int(reached)}/1",
                     "best_test_loss": final.get("test_loss"), "total_wall_s": final["wall_time_s"]})

    payload = session.header("search")
    payload.update(target=target, target_source=source, objective=cfg.objective,
                   total_wall_time_s=time.perf_counter() - start, summary=rows, trials=trials, oho=oho)
    path = common.write_results(payload, session.path("search"))
    print(f"\nsearch on {session.task.name}: target test loss {target:.4f} ({source}), {cfg.trials} trials x "
          f"{cfg.repeats} repeat(s), objective {cfg.objective}")
    print(common.format_table(rows, COLUMNS))
    print(f"results: {path}  ({payload['total_wall_time_s']:.0f} s in all)")
    payload["path"] = str(path)
    return payload


if __name__ == "__main__":
    main()
