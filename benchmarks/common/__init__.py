"""Shared machinery of the ohotorch benchmarks: configuration, data iteration, the training loop, records.

The task scripts (digits.py, mnist.py, cifar10_resnet18.py) only describe their data and models; every
method - the OHO variants and the paper's five baselines - runs through :func:`run_method`, so a
comparison differs between methods only in the optimizer. search.py and robustness.py reuse the same
loop on any of the tasks through :func:`load_task`.

Modules: :mod:`.config` (dataclass configs, command-line parsing), :mod:`.runtime` (seeds, device,
environment), :mod:`.data`, :mod:`.models`, :mod:`.optimizers` (the one optimizer factory and its method
names), :mod:`.training` (closures, :func:`run_method`, :class:`Recorder`, evaluation), :mod:`.results`
(JSON files, tables, statistics) and :mod:`.tasks` (tasks, sessions, the comparison entry point). Every
public name is re-exported here: ``from common import run_method``.

Benchmarks sit outside the package and use only ohotorch's public API (``OHO``, ``OHOAdam``,
``OHOAdamW``, ``layerwise``, ``grouped``, ``cycle``).
"""
from .config import (ConfigError, TrainConfig, build_parser, config_help, field_help, parse_config,
                     peek_option)
from .data import Data, TensorLoader, split_indices, synthetic_images, tensor_data
from .models import mlp, small_cnn
from .optimizers import (ALL_METHODS, BASELINES, EXTRA_METHODS, HYPER_NAMES, OHO_METHODS, Method,
                         OptimizerSettings, build_oho, build_optimizer, group_names, has_buffers, hyperparameters,
                         is_method, parse_method, parse_options)
from .results import (SUMMARY_COLUMNS, format_table, geometric_mean, payload_header, results_path, summary_rows,
                      write_results)
from .runtime import (BENCH_DIR, REPO_ROOT, RESULTS_DIR, environment, import_ohotorch, package_version, resolve_device,
                      seed_everything, setup_runtime)
from .tasks import TASK_MODULES, Session, Task, compare_main, load_task, open_session
from .training import (Recorder, autocast, evaluate, evaluate_splits, final_figures, make_closure, run_method,
                       to_device)

__all__ = [
    "ALL_METHODS", "BASELINES", "BENCH_DIR", "ConfigError", "Data", "EXTRA_METHODS", "HYPER_NAMES", "Method",
    "OHO_METHODS", "OptimizerSettings", "REPO_ROOT", "RESULTS_DIR", "Recorder", "SUMMARY_COLUMNS", "Session",
    "TASK_MODULES", "Task", "TensorLoader", "TrainConfig", "autocast", "build_oho", "build_optimizer",
    "build_parser", "compare_main", "config_help", "environment", "evaluate", "evaluate_splits", "field_help",
    "final_figures", "format_table", "geometric_mean", "group_names", "has_buffers", "hyperparameters",
    "import_ohotorch", "package_version", "is_method", "load_task", "make_closure", "mlp", "open_session", "parse_config",
    "parse_method", "parse_options", "payload_header", "peek_option", "resolve_device", "results_path",
    "run_method", "seed_everything", "setup_runtime", "small_cnn", "split_indices", "summary_rows",
    "synthetic_images", "tensor_data", "to_device", "write_results",
]
