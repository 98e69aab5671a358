"""The tasks of the development suite (benchmarks/suite.py): data, model, loss, budget and lr grids.

Four tasks, every one generated offline from a fresh install:

* ``digits_mlp`` / ``digits_cnn``: scikit-learn's bundled 8x8 digits (997 train / 300 val / 500 test),
  the 4-layer ReLU MLP and the small CNN of benchmarks/digits.py, SGD with momentum 0.9. Small data:
  here overfitting, not optimisation, limits the result.
* ``teacher``: a teacher-student image task. Images (3x16x16) are smooth random fields plus pixel noise,
  drawn fresh for every training batch; the labels are the argmax of a fixed random convolutional
  teacher (10 classes, balanced by per-class offsets). The student is a small ResNet (BatchNorm, three
  residual stages, width 8). Data are unlimited and the labels deterministic, so the loss can approach 0 and
  optimisation alone limits it: the regime where a large learning rate wins in the long run.
* ``charlm``: a character-level causal transformer (2 layers, width 48, context 32) trained with AdamW
  on the source text of fixed Python standard-library modules (the corpus is rebuilt from the running
  interpreter; its SHA-256 and the Python version are in every results file). Contiguous 80/10/10
  train / validation / test split.

Each task draws training batches from a seeded stream (the same stream for every method at one seed)
and validation batches for OHO's hyper-steps from its validation split; the test split is only ever
reported. ``quick=True`` shrinks every task to a few steps of a smaller model for smoke tests.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402

Batch = Tuple[Tensor, Tensor]


@dataclass
class Task:
    """One suite task. ``family`` is the optimizer family it is trained with ("sgd": SGD with momentum,
    the fixed and cosine grids and OHO; "adamw": AdamW grids and OHOAdamW)."""

    name: str
    family: str
    steps: int
    batch_size: int
    model_fn: Callable[[], nn.Module]
    train_stream: Callable[[int], Iterator[Batch]]  # seed -> endless training batches
    val_stream: Callable[[int], Iterator[Batch]]  # seed -> endless validation batches (hyper-steps)
    eval_sets: Dict[str, Tuple[Tensor, Tensor]]  # "val" / "test": fixed tensors for reporting
    weight_decay: float
    momentum: float = 0.9
    grid_lrs: Tuple[float, ...] = ()  # the fixed and cosine grids of the task's family
    adamw_lrs: Tuple[float, ...] = ()  # AdamW grid (for the sgd family: a smaller cross-check grid)
    adamw_weight_decay: float = 0.01
    oho_lr0s: Tuple[float, ...] = ()  # the three initial lrs of OHO (spanning 100x)
    sequence: bool = False  # logits (B, T, V) against targets (B, T)
    evals: int = 10  # evaluations of val/test loss during training (and one before)
    info: Dict[str, object] = field(default_factory=dict)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        if self.sequence:
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return F.cross_entropy(logits, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, chunk: int = 512) -> Dict[str, float]:
        """Mean cross-entropy and accuracy (per token for the LM) over a fixed split, in eval mode."""
        was_training = model.training
        model.eval()
        x, y = self.eval_sets[split]
        loss_sum, correct, count = 0.0, 0, 0
        for lo in range(0, len(y), chunk):
            logits = model(x[lo:lo + chunk])
            target = y[lo:lo + chunk]
            if self.sequence:
                logits, target = logits.flatten(0, 1), target.flatten()
            loss_sum += float(F.cross_entropy(logits.float(), target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
        model.train(was_training)
        return {"loss": loss_sum / count, "acc": correct / count}


def _cycle_shuffled(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled passes over in-memory tensors (drop_last), seeded."""
    g = torch.Generator().manual_seed(seed)
    n = len(y)
    while True:
        order = torch.randperm(n, generator=g)
        for k in range(n // batch_size):
            idx = order[k * batch_size:(k + 1) * batch_size]
            yield x[idx], y[idx]


# ---------------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _digits_splits() -> Dict[str, Tuple[Tensor, Tensor]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    val, test, train = common.split_indices(len(y), (300, 500, len(y) - 800), 0)  # as benchmarks/digits.py
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}


def digits(model: str, quick: bool) -> Task:
    splits = _digits_splits()
    batch = 50
    epochs = 1 if quick else 60
    steps = epochs * (len(splits["train"][1]) // batch)
    if model == "mlp":
        width = 16 if quick else 128
        model_fn = functools.partial(common.mlp, 64, width, 4, 10)
    else:
        width = 8 if quick else 32
        model_fn = functools.partial(common.small_cnn, 1, 8, width, 10)
    return Task(
        name=f"digits_{model}", family="sgd", evals=2 if quick else 10, steps=steps, batch_size=batch,
        model_fn=model_fn,
        train_stream=lambda seed: _cycle_shuffled(*splits["train"], batch, seed * 1000),
        val_stream=lambda seed: _cycle_shuffled(*splits["val"], 100, seed * 1000 + 1),
        eval_sets={"val": splits["val"], "test": splits["test"]},
        weight_decay=1e-4, grid_lrs=(0.003, 0.01, 0.03, 0.1, 0.3), adamw_lrs=(3e-4, 1e-3, 3e-3),
        oho_lr0s=(0.001, 0.01, 0.1),
        info={"dataset": "sklearn digits", "sizes": {k: len(v[1]) for k, v in splits.items()},
              "epochs": epochs, "model": model, "width": width},
    )


# ---------------------------------------------------------------------------------------------------
# teacher-student images (generated)
# ---------------------------------------------------------------------------------------------------
TEACHER_SHAPE = (3, 16, 16)


def _smooth_images(n: int, g: torch.Generator) -> Tensor:
    """Smooth random fields (bilinear upsampling of 4x4 and 8x8 Gaussian noise) plus pixel noise."""
    c, h, w = TEACHER_SHAPE
    coarse = F.interpolate(torch.randn(n, c, 4, 4, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    mid = F.interpolate(torch.randn(n, c, 8, 8, generator=g), size=(h, w), mode="bilinear", align_corners=False)
    return coarse + 0.5 * mid + 0.25 * torch.randn(n, c, h, w, generator=g)


class _Teacher(nn.Module):
    """A fixed random CNN; labels are the argmax of its (class-balanced) logits."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, stride=2)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        for p in self.parameters():
            with torch.no_grad():
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        self.register_buffer("offset", torch.zeros(10))
        self.register_buffer("scale", torch.ones(10))
        self.requires_grad_(False)
        # balance the classes: standardise each logit on a calibration set, then a few rounds of
        # shifting the logits by their log class frequency
        calib = _smooth_images(2048, g)
        with torch.no_grad():
            raw = self.logits(calib)
            self.scale.copy_(1.0 / raw.std(0))
            self.offset.copy_(-raw.mean(0) / raw.std(0))
            for _ in range(10):
                counts = torch.bincount(self.labels(calib), minlength=10).float() + 1.0
                self.offset -= 0.2 * torch.log(counts / counts.mean())

    def logits(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        h = F.adaptive_avg_pool2d(h, 4).flatten(1)
        return self.fc(h) * self.scale + self.offset

    @torch.no_grad()
    def labels(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(1)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


class SmallResNet(nn.Module):
    """conv-BN-ReLU stem, residual stages of width w, 2w (stride 2), 4w (stride 2), pooling, linear."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(_Block(width, width, 1), _Block(width, 2 * width, 2),
                                    _Block(2 * width, 4 * width, 2))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1))


@functools.lru_cache(maxsize=None)
def _teacher_sets(n_val: int, n_test: int) -> Tuple[_Teacher, Dict[str, Tuple[Tensor, Tensor]]]:
    teacher = _Teacher(seed=12345)
    g = torch.Generator().manual_seed(54321)
    sets = {}
    for split, n in (("val", n_val), ("test", n_test)):
        x = _smooth_images(n, g)
        sets[split] = (x, teacher.labels(x))
    return teacher, sets


def _teacher_stream(teacher: _Teacher, batch_size: int, seed: int) -> Iterator[Batch]:
    """Fresh samples for every batch (seeded, so every method at one seed sees the same stream)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    while True:
        x = _smooth_images(batch_size, g)
        yield x, teacher.labels(x)


def teacher_student(quick: bool) -> Task:
    n_val, n_test = (128, 128) if quick else (2048, 4096)
    teacher, sets = _teacher_sets(n_val, n_test)
    batch = 32
    width = 4 if quick else 8
    steps = 12 if quick else 1200
    counts = torch.bincount(sets["test"][1], minlength=10).tolist()
    return Task(
        name="teacher", family="sgd", evals=2 if quick else 10, steps=steps, batch_size=batch,
        model_fn=functools.partial(SmallResNet, width, 10),
        train_stream=lambda seed: _teacher_stream(teacher, batch, seed),
        val_stream=lambda seed: _cycle_shuffled(*sets["val"], batch, seed * 1000 + 1),
        eval_sets=sets, weight_decay=1e-4, grid_lrs=(0.01, 0.03, 0.1, 0.3, 1.0), adamw_lrs=(3e-4, 1e-3, 3e-3),
        oho_lr0s=(0.001, 0.01, 0.1),
        info={"dataset": "teacher-student, 3x16x16 smooth random images, fresh every batch",
              "sizes": {"train": steps * batch, "val": n_val, "test": n_test}, "test_class_counts": counts,
              "model": f"SmallResNet(width={width})"},
    )


# ---------------------------------------------------------------------------------------------------
# character-level language model (Python standard-library sources)
# ---------------------------------------------------------------------------------------------------
CORPUS_MODULES = ("argparse", "textwrap", "difflib", "string", "shlex", "calendar", "pprint", "heapq",
                  "bisect", "fractions", "statistics", "dataclasses", "enum", "functools", "glob", "fnmatch")


@functools.lru_cache(maxsize=None)
def corpus() -> Tuple[str, Dict[str, object]]:
    """The concatenated source text of :data:`CORPUS_MODULES` from the running interpreter."""
    parts = []
    for name in CORPUS_MODULES:
        parts.append(inspect.getsource(importlib.import_module(name)))
    text = "\n".join(parts)
    info = {"modules": list(CORPUS_MODULES), "python": sys.version.split()[0], "chars": len(text),
            "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return text, info


VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # printable ASCII; anything else maps to "?"


def encode(text: str) -> Tensor:
    index = {c: i for i, c in enumerate(VOCAB)}
    unknown = index["?"]
    return torch.tensor([index.get(c, unknown) for c in text], dtype=torch.int64)


class CharTransformer(nn.Module):
    """A pre-norm causal transformer over characters with learned positions."""

    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _windows(ids: Tensor, context: int, limit: int) -> Tuple[Tensor, Tensor]:
    """Non-overlapping (input, next-character target) windows, at most ``limit``."""
    n = min((len(ids) - 1) // context, limit)
    x = ids[:n * context].view(n, context)
    y = ids[1:n * context + 1].view(n, context)
    return x, y


def _random_windows(ids: Tensor, context: int, batch_size: int, seed: int) -> Iterator[Batch]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context)
    while True:
        start = torch.randint(len(ids) - context - 1, (batch_size, 1), generator=g)
        idx = start + offsets
        yield ids[idx], ids[idx + 1]


def char_lm(quick: bool) -> Task:
    text, info = corpus()
    ids = encode(text)
    n = len(ids)
    train, val, test = ids[:int(0.8 * n)], ids[int(0.8 * n):int(0.9 * n)], ids[int(0.9 * n):]
    context = 16 if quick else 32
    width = 16 if quick else 48
    batch = 16 if quick else 32
    steps = 12 if quick else 1000
    eval_windows = 32 if quick else 512
    return Task(
        name="charlm", family="adamw", evals=2 if quick else 10, steps=steps, batch_size=batch,
        model_fn=functools.partial(CharTransformer, len(VOCAB), context, width, 2, 4 if width >= 32 else 2),
        train_stream=lambda seed: _random_windows(train, context, batch, 10_000 + seed),
        val_stream=lambda seed: _random_windows(val, context, batch, 20_000 + seed),
        eval_sets={"val": _windows(val, context, eval_windows), "test": _windows(test, context, eval_windows)},
        weight_decay=0.01, grid_lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2), adamw_lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        oho_lr0s=(1e-4, 1e-3, 1e-2), sequence=True,
        info={"dataset": "Python standard-library sources", "corpus": info, "context": context, "width": width,
              "sizes": {"train_chars": len(train), "val_chars": len(val), "test_chars": len(test)}},
    )


TASKS: Dict[str, Callable[[bool], Task]] = {
    "digits_mlp": functools.partial(digits, "mlp"),
    "digits_cnn": functools.partial(digits, "cnn"),
    "teacher": teacher_student,
    "charlm": char_lm,
}


@functools.lru_cache(maxsize=None)
def get_task(name: str, quick: bool = False) -> Task:
    """The task by name (built once per process)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](quick)


def task_summary(task: Task) -> Dict[str, object]:
    return {"family": task.family, "steps": task.steps, "batch_size": task.batch_size,
            "weight_decay": task.weight_decay, "momentum": task.momentum, "grid_lrs": list(task.grid_lrs),
            "adamw_lrs": list(task.adamw_lrs), "adamw_weight_decay": task.adamw_weight_decay,
            "oho_lr0s": list(task.oho_lr0s), **task.info}
