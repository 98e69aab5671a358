"""Runtime: seeds, devices, and the environment facts (versions, device, git revision, source digest)
written into every results file."""
from __future__ import annotations

import datetime
import hashlib
import importlib
import importlib.metadata
import os
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


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



def setup_runtime(cfg: Any) -> torch.device:
    """Apply thread count and CUDA backend flags; return the device."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    return device



def package_version(name: str) -> Optional[str]:
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
    versions = {name: package_version(name) for name in ("torch", "torchvision", "numpy", "scikit-learn",
                                                           "optuna", "tqdm")}
    versions["ohotorch"] = getattr(ohotorch, "__version__", None) or package_version("ohotorch")
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
