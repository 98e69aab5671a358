"""docs/porting.md runs: every diff marked ``<!-- test: name -->`` is applied (its context and added lines
kept, its removed lines dropped) and executed for a few steps on small synthetic data, on CPU, with the
names the original script defines elsewhere (Net, args, the datasets, get_batch, ...) supplied here.
The removed side must still parse, so a diff cannot drift into something that was never the original.
"""
import argparse
import math
import re
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ohotorch

DOC = Path(__file__).resolve().parent.parent / "docs" / "porting.md"


def _side(diff: str, dropped: str) -> str:
    lines = []
    for line in diff.splitlines():
        if line.startswith(dropped):
            continue
        if line.startswith(("+", "-", " ")):
            lines.append(line[1:])
        elif line == "":
            lines.append("")
        else:
            raise ValueError(f"not a diff line: {line!r}")
    return textwrap.dedent("\n".join(lines))


def recipe(name: str):
    """The ported code of each diff block named ``name``, in document order."""
    blocks = re.findall(r"<!-- test: (\w+) -->\n```diff\n(.*?)```", DOC.read_text(), re.S)
    diffs = [body for n, body in blocks if n == name]
    assert diffs, f"no diff named {name!r} in {DOC}"
    for i, diff in enumerate(diffs):
        compile(_side(diff, "+"), f"{DOC.name}:{name}[{i}] (original)", "exec")
    return [compile(_side(diff, "-"), f"{DOC.name}:{name}[{i}]", "exec") for i, diff in enumerate(diffs)]


def test_every_diff_is_tested():
    names = set(re.findall(r"<!-- test: (\w+) -->\n```diff", DOC.read_text()))
    assert names == {"mnist", "cifar", "lightning_automatic", "lightning_manual", "nanogpt"}
    assert DOC.read_text().count("```diff") == 6  # every diff carries a test marker


class MnistNet(nn.Module):
    """pytorch/examples mnist/main.py's Net."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


def fake_images(size, shape, offset):
    from torchvision.datasets import FakeData

    def make(root=None, train=True, download=False, transform=None):
        return FakeData(size=size if train else size // 4, image_size=shape, num_classes=10, transform=transform,
                        random_offset=offset if train else offset + 100_000)

    return make


def test_mnist(capsys):
    from torchvision import transforms

    torch.manual_seed(0)
    made, tested = [], []

    def step_lr(optimizer, **kw):
        made.append(optimizer)
        return torch.optim.lr_scheduler.StepLR(optimizer, **kw)

    ns = dict(
        torch=torch, F=F, nn=nn, Net=MnistNet, StepLR=step_lr, device=torch.device("cpu"),
        datasets=types.SimpleNamespace(MNIST=fake_images(40, (1, 28, 28), 0)),
        args=argparse.Namespace(batch_size=8, test_batch_size=16, epochs=1, lr=1.0, gamma=0.7, log_interval=3,
                                dry_run=False),
        train_kwargs={"batch_size": 8, "shuffle": True}, test_kwargs={"batch_size": 16},
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]),
        test=lambda model, device, loader: tested.append(len(loader.dataset)),
    )
    for code in recipe("mnist"):
        exec(code, ns)
    ns["main"]()
    opt = made[0]
    assert isinstance(opt, ohotorch.OHOAdam) and tested == [10]
    assert opt.counters["steps"] == opt.counters["hyper_steps"] == 5  # 36 training images (90%) in batches of 8
    assert opt.param_groups[0]["lr_scale"] != 1.0
    assert "Train Epoch: 1 [0/36" in capsys.readouterr().out


class TinyResNet(nn.Module):
    """Stands in for kuangliu's ResNet18: convolution, BatchNorm, a residual, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_cifar():
    from torchvision import transforms

    torch.manual_seed(0)
    normalize = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    ns = dict(
        torch=torch, nn=nn, optim=torch.optim, ResNet18=TinyResNet, device="cpu", args=argparse.Namespace(lr=0.1),
        torchvision=types.SimpleNamespace(datasets=types.SimpleNamespace(CIFAR10=fake_images(300, (3, 32, 32), 0))),
        transform_train=transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                            transforms.ToTensor(), normalize]),
        transform_test=transforms.Compose([transforms.ToTensor(), normalize]),
    )
    for code in recipe("cifar"):
        exec(code, ns)
    # The validation split is the held-out 10% of the training images, read with the test transform.
    assert not set(ns["trainset"].indices) & set(ns["valset"].indices) and len(ns["valset"]) == 30
    assert ns["valset"].dataset.transform is ns["transform_test"]
    ns["train"](0)
    opt = ns["optimizer"]
    assert opt.counters["steps"] == opt.counters["hyper_steps"] == 3  # 270 images in batches of 128
    assert opt.param_groups[0]["weight_decay"] != 5e-4 and opt.param_groups[0]["lr_scale"] != 1.0
    assert all(torch.isfinite(p).all() for p in ns["net"].parameters())


def classification_datamodule(L):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 28, 28, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, :14].mean((1, 2)) > 0).long()
    loader = torch.utils.data.DataLoader

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return loader(torch.utils.data.TensorDataset(x[:64], y[:64]), batch_size=8, shuffle=True)

        def val_dataloader(self):
            return loader(torch.utils.data.TensorDataset(x[64:], y[64:]), batch_size=8)

    return DM()


def lightning_namespace(tmp_path, monkeypatch):
    L = pytest.importorskip("lightning.pytorch")
    monkeypatch.chdir(tmp_path)  # the Trainer writes its logs and checkpoints under the working directory
    torch.manual_seed(0)
    return dict(torch=torch, nn=nn, F=F, L=L, dm=classification_datamodule(L))


def test_lightning_automatic(tmp_path, monkeypatch):
    ns = lightning_namespace(tmp_path, monkeypatch)
    for code in recipe("lightning_automatic"):
        exec(code, ns)
    trainer = ns["trainer"]
    opt = trainer.optimizers[0]
    assert isinstance(opt, ohotorch.OHO)
    assert opt.counters["steps"] == opt.counters["hyper_steps"] == 8  # 2 epochs x 8 batches / accumulation 2
    group = opt.param_groups[0]
    assert group["lr_scale"] != 1.0 and group["weight_decay"] != 5e-4
    logged = trainer.logged_metrics
    assert float(logged["oho/effective_lr"]) == pytest.approx(group["lr"] * group["lr_scale"], rel=1e-6)


def test_lightning_manual(tmp_path, monkeypatch):
    ns = lightning_namespace(tmp_path, monkeypatch)
    for code in recipe("lightning_manual"):
        exec(code, ns)
    runs = [(ns["trainer"], 16, False)]  # the recipe as written: greedy, 2 epochs x 8 batches
    # The same module with the full horizon: every finite-difference evaluation runs all micro-batches.
    trainer = ns["L"].Trainer(max_epochs=1, callbacks=[ns["OHOCallback"]()])
    trainer.fit(ns["LitClassifier"](discount=1.0), datamodule=ns["dm"])
    runs.append((trainer, 8, True))
    for trainer, steps, full_horizon in runs:
        opt = trainer.optimizers[0]
        assert opt.counters["steps"] == opt.counters["hyper_steps"] == steps
        assert opt.counters["nonfinite_influence"] == opt.counters["nonfinite_hypergradients"] == 0
        assert opt.param_groups[0]["lr_scale"] != 1.0
        if full_horizon:
            norms = opt.diagnostics["influence_norm"]
            assert all(0 < n < math.inf for n in norms.values())
        # The closure clipped: the gradient the last step used has norm <= clip.
        grads = [p.grad for p in trainer.lightning_module.parameters()]
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])) <= 1.0 + 1e-5


class TinyGPT(nn.Module):
    """Stands in for nanoGPT's GPT: embeddings, a LayerNorm, a head; forward(idx, targets) -> (logits, loss)."""

    def __init__(self, vocab=16, width=16, block=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(block, width)
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        logits = self.head(self.ln(x))
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def test_nanogpt():
    torch.manual_seed(0)
    corpus = {"train": torch.arange(400) * 7 % 16, "val": torch.arange(100) * 7 % 16}
    g = torch.Generator().manual_seed(0)

    def get_batch(split):
        data = corpus[split]
        ix = torch.randint(len(data) - 9, (4,), generator=g)
        return torch.stack([data[i:i + 8] for i in ix]), torch.stack([data[i + 1:i + 9] for i in ix])

    learning_rate, min_lr, warmup_iters, lr_decay_iters = 1e-2, 1e-3, 2, 5

    def get_lr(it):  # nanoGPT's warmup + cosine
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it > lr_decay_iters:
            return min_lr
        coeff = 0.5 * (1.0 + math.cos(math.pi * (it - warmup_iters) / (lr_decay_iters - warmup_iters)))
        return min_lr + coeff * (learning_rate - min_lr)

    ns = dict(torch=torch, ohotorch=ohotorch, inspect=None)
    method, loop = recipe("nanogpt")
    exec(method, ns)

    class GPT(TinyGPT):
        configure_optimizers = ns["configure_optimizers"]

    model = GPT()
    ns.update(model=model, get_batch=get_batch, get_lr=get_lr, decay_lr=True, learning_rate=learning_rate,
              iter_num=0, max_iters=5, gradient_accumulation_steps=3, grad_clip=1.0, weight_decay=0.1,
              beta1=0.9, beta2=0.95, device_type="cpu", dtype="bfloat16", ddp=False,
              ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    exec(loop, ns)
    opt = ns["optimizer"]
    assert isinstance(opt, ohotorch.OHOAdamW) and opt.compute_dtype is torch.bfloat16
    assert opt.counters["steps"] == opt.counters["hyper_steps"] == 6  # iterations 0..5
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] != 0.1 and no_decay["weight_decay"] == 0.0  # the no-decay group stays at 0
    assert decay["lr"] == no_decay["lr"] == get_lr(5)  # get_lr owns group['lr'] ...
    assert decay["lr_scale"] != 1.0 and no_decay["lr_scale"] != 1.0  # ... OHO tunes the multiplier
    # The closure clipped: the gradient the last step used (the first evaluation's) has norm <= grad_clip.
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm <= 1.0 + 1e-5
    assert float(ns["loss"]) < math.log(16)  # it learns the sequence
