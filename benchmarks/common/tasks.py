"""Tasks, sessions and the comparison entry point of the task scripts."""
from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .config import parse_config, peek_option
from .data import Data
from .results import (SUMMARY_COLUMNS, _round, format_table, payload_header, results_path, summary_rows,
                      write_results)
from .runtime import BENCH_DIR, environment, setup_runtime
from .training import run_method

# The tasks that search.py and robustness.py can run, by the name given on the command line.
TASK_MODULES: Dict[str, str] = {"digits": "digits", "mnist": "mnist", "cifar10": "cifar10_resnet18",
                                "cifar10_resnet18": "cifar10_resnet18"}


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
