"""ohotorch.lightning: OHOCallback under Lightning's Trainer.

Each run is compared bit for bit with the loop Lightning's automatic optimisation amounts to (written
out by hand with OHO's closures), so the tests see that hyper-steps happen exactly on the batches where
the optimizer stepped, with the right validation batches, and that checkpoint resume continues exactly.
"""
import csv
import math
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ohotorch

L = pytest.importorskip("lightning.pytorch")
from ohotorch.lightning import OHOCallback, hyperparameter_log  # noqa: E402

N_TRAIN, N_VAL, BATCH = 32, 12, 4  # 8 training batches, 3 validation batches


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, 4, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(N_TRAIN + N_VAL, 1, generator=g, dtype=torch.float64)
    train = DataLoader(TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), batch_size=BATCH, shuffle=False)
    val = DataLoader(TensorDataset(x[N_TRAIN:], y[N_TRAIN:]), batch_size=BATCH, shuffle=False)
    return train, val


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def make_sgd(params, module, **kw):
    return ohotorch.OHO(params, lr=0.05, momentum=0.9, weight_decay=1e-3, module=module, **kw)


class Tiny(L.LightningModule):
    def __init__(self, make_opt=make_sgd, scheduler=None, **opt_kw):
        super().__init__()
        self.net = net()
        self.make_opt, self.scheduler, self.opt_kw = make_opt, scheduler, opt_kw

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def oho_val_loss(self, batch):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        opt = self.make_opt(self.parameters(), self, **self.opt_kw)
        if self.scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler(opt), "interval": "step"}}


class Data(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.train, self.val = data()

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return self.val


def trainer(tmp_path, callbacks, *, max_epochs=1, accumulate=1, logger=False, devices=1, **kw):
    return L.Trainer(
        accelerator="cpu", devices=devices, max_epochs=max_epochs, accumulate_grad_batches=accumulate,
        callbacks=callbacks, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
        default_root_dir=str(tmp_path), **kw)


def mse_closure(opt, model, batch, scale=1.0, clear=True):
    x, y = batch

    def closure():
        if clear:
            opt.zero_grad()
        loss = F.mse_loss(model(x), y) / scale
        loss.backward()
        return loss.detach()

    return closure


def reference(epochs, accumulate, scheduler=None, **opt_kw):
    """What Lightning's automatic optimisation does, written out: the first accumulate - 1 batches of a
    window run forward/backward outside any step; the last one's closure (no zero_grad) goes to step()."""
    train, val = data()
    model = net()
    opt = make_sgd(model.parameters(), model, **opt_kw)
    sched = scheduler(opt) if scheduler is not None else None
    val_batches = ohotorch.cycle(val)
    for _ in range(epochs):
        for k, batch in enumerate(train):
            first, last = k % accumulate == 0, (k + 1) % accumulate == 0 or k == len(train) - 1
            closure = mse_closure(opt, model, batch, scale=accumulate, clear=False)
            if first:
                opt.zero_grad()
            if not last:
                closure()
                continue
            opt.step(closure)
            opt.hyper_step(mse_closure(opt, model, next(val_batches)))
            if sched is not None:
                sched.step()
    return model, opt


def assert_same_run(model, opt, ref_model, ref_opt):
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    for g, h in zip(opt.param_groups, ref_opt.param_groups):
        for name in ("lr", "lr_scale", "weight_decay", "momentum"):
            assert g[name] == h[name], name
    assert opt.counters == ref_opt.counters


@pytest.mark.parametrize("accumulate,opt_kw", [
    (2, {}),                                           # greedy default: exact with accumulation
    (1, {"discount": 1.0, "hvp": "central"}),          # full horizon: Lightning's closure re-run for HVPs
])
def test_callback_matches_the_written_out_loop(tmp_path, accumulate, opt_kw):
    model = Tiny(**opt_kw)
    callback = OHOCallback()  # validation batches from the datamodule
    trainer(tmp_path, [callback], accumulate=accumulate).fit(model, datamodule=Data())
    opt = model.trainer.optimizers[0]
    ref_model, ref_opt = reference(1, accumulate, **opt_kw)
    steps = N_TRAIN // BATCH // accumulate
    assert opt.counters["steps"] == steps and opt.counters["hyper_steps"] == steps == callback.hyper_steps
    assert callback.val_batches_drawn == steps
    assert opt.param_groups[0]["lr"] != 0.05  # it tuned
    assert_same_run(model.net, opt, ref_model, ref_opt)


def test_full_horizon_with_accumulation_is_refused(tmp_path):
    with pytest.raises(ValueError, match="accumulate_grad_batches=2"):
        trainer(tmp_path, [OHOCallback()], accumulate=2).fit(Tiny(discount=1.0), datamodule=Data())


def warmup(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 3))


def test_checkpoint_resume_through_fit_ckpt_path(tmp_path):
    """Two epochs in one run == one epoch, a checkpoint, and fit(ckpt_path=...) for the second, bit for bit:
    weights, tuned values, meta-optimizer state, scheduler, and the position in the validation loader."""
    opt_kw = dict(scheduler=warmup, tune=("lr_scale", "weight_decay"))
    _, val = data()
    train, _ = data()

    whole = Tiny(**opt_kw)
    trainer(tmp_path / "whole", [OHOCallback(val)], max_epochs=2, accumulate=2).fit(whole, train)

    first = Tiny(**opt_kw)
    t1 = trainer(tmp_path / "first", [OHOCallback(val)], max_epochs=1, accumulate=2)
    t1.fit(first, train)
    path = str(tmp_path / "epoch1.ckpt")
    t1.save_checkpoint(path)

    resumed = Tiny(**opt_kw)
    callback = OHOCallback(val)
    logger = L.loggers.CSVLogger(str(tmp_path), name="log")
    t2 = trainer(tmp_path / "second", [callback], max_epochs=2, accumulate=2, logger=logger)
    t2.fit(resumed, train, ckpt_path=path)

    steps = 2 * N_TRAIN // BATCH // 2
    assert callback.val_batches_drawn == steps == callback.hyper_steps  # restored 4, drew 4 more
    opt, ref = resumed.trainer.optimizers[0], whole.trainer.optimizers[0]
    assert_same_run(resumed.net, opt, whole.net, ref)
    assert opt.state_dict()["oho"]["meta_state"] == ref.state_dict()["oho"]["meta_state"]
    ref_model, ref_opt = reference(2, 2, scheduler=warmup, tune=("lr_scale", "weight_decay"))
    assert_same_run(resumed.net, opt, ref_model, ref_opt)

    # The effective lr is logged beside the scheduled lr and the tuned multiplier, every hyper-step.
    logger.finalize("success")
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("oho/effective_lr")]
    assert len(rows) == steps // 2
    for r in rows:
        assert math.isclose(float(r["oho/effective_lr"]), float(r["oho/lr"]) * float(r["oho/lr_scale"]), rel_tol=1e-6)
        assert float(r["oho/weight_decay"]) > 0 and float(r["oho/val_loss"]) > 0
    group = opt.param_groups[0]
    assert float(rows[-1]["oho/effective_lr"]) == pytest.approx(group["lr"] * group["lr_scale"], rel=1e-6)


def test_every_n_steps_and_eval_mode(tmp_path):
    modes = []

    def loss_fn(module, batch):
        modes.append(module.training)
        x, y = batch
        return F.mse_loss(module(x), y)

    _, val = data()
    model = Tiny()
    callback = OHOCallback(val, loss_fn=loss_fn, every_n_steps=3, eval_mode=True)
    trainer(tmp_path, [callback]).fit(model, data()[0])
    assert model.trainer.optimizers[0].counters == {"steps": 8, "hyper_steps": 3, "nonfinite_hypergradients": 0,
                                                     "nonfinite_influence": 0}  # after steps 1, 4, 7
    assert modes == [False] * 3 and model.training


def test_log_keys_per_group():
    model = net()
    opt = ohotorch.OHO(ohotorch.layerwise(model), lr=0.1, tune=("lr_scale",))
    opt.param_groups[1]["lr_scale"] = 0.5
    log = hyperparameter_log(opt)
    assert log == {"oho/0/lr": 0.1, "oho/0/lr_scale": 1.0, "oho/0/effective_lr": 0.1,
                   "oho/2/lr": 0.1, "oho/2/lr_scale": 0.5, "oho/2/effective_lr": 0.05}
    assert hyperparameter_log(ohotorch.OHO(model.parameters(), tune=())) == {}


class NoValLoss(Tiny):
    oho_val_loss = None


@pytest.mark.parametrize("case,error,match", [
    ("plain optimizer", ValueError, "exactly one ohotorch optimizer"),
    ("no validation data", ValueError, "found no validation data"),
    ("no validation loss", AttributeError, "oho_val_loss"),
])
def test_clear_errors(tmp_path, case, error, match):
    model = NoValLoss() if case == "no validation loss" else Tiny()
    if case == "plain optimizer":
        model.make_opt = lambda params, module: torch.optim.SGD(params, lr=0.1)
    callback = OHOCallback(None if case == "no validation data" else data()[1])
    with pytest.raises(error, match=match):
        trainer(tmp_path, [callback]).fit(model, data()[0])


def test_warns_about_buffers_without_module(tmp_path):
    class WithBatchNorm(Tiny):
        def __init__(self):
            super().__init__(make_opt=lambda params, module: ohotorch.OHO(params, lr=0.05))
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)).double()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [OHOCallback(data()[1])], max_steps=1).fit(WithBatchNorm(), data()[0])
    assert any("without module=" in str(w.message) for w in caught)


def test_import_ohotorch_does_not_import_lightning():
    import subprocess
    import sys

    code = "import sys, ohotorch; assert 'lightning' not in sys.modules and 'ohotorch.lightning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _half_of_the_validation_batch(module, batch):
    """Each rank takes its share of the validation batch (the whole batch in one process)."""
    x, y = batch
    rank, world = module.global_rank, module.trainer.world_size
    return F.mse_loss(module(x[rank::world]), y[rank::world])


class _Record(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        torch.save({"group": {k: opt.param_groups[0][k] for k in ("lr", "weight_decay")},
                    "counters": opt.counters, "weights": [p.detach().clone() for p in pl_module.parameters()]},
                   f"{self.path}/rank{trainer.global_rank}.pt")


def test_ddp_ranks_agree_and_match_one_process(tmp_path):
    """2 gloo ranks (CPU), both on the same training batches (no distributed sampler), each taking half of
    every validation batch: the callback averages the validation gradient over the ranks, so both tune
    the same values, and those of one process on the whole validation batches (float64, to rounding)."""
    train, val = data()
    val_loader = DataLoader(val.dataset, batch_size=2 * BATCH, shuffle=False)
    runs = {}
    for name, devices in (("ddp", 2), ("single", 1)):
        path = tmp_path / name
        path.mkdir()
        trainer(path, [OHOCallback(val_loader, loss_fn=_half_of_the_validation_batch), _Record(str(path))],
                devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                use_distributed_sampler=False).fit(Tiny(), train)
        runs[name] = [torch.load(path / f"rank{r}.pt") for r in range(devices)]
    rank0, rank1 = runs["ddp"]
    (single,) = runs["single"]
    assert rank0["group"] == rank1["group"] and rank0["counters"] == rank1["counters"] == single["counters"]
    assert single["counters"]["hyper_steps"] == N_TRAIN // BATCH
    for a, b in zip(rank0["weights"], rank1["weights"]):
        assert torch.equal(a, b)
    initial = make_sgd(net().parameters(), None).param_groups[0]
    for name in ("lr", "weight_decay"):
        assert rank0["group"][name] == pytest.approx(single["group"][name], rel=1e-9)
        assert single["group"][name] != initial[name]
    for a, b in zip(rank0["weights"], single["weights"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


class _CLIModel(Tiny):
    def __init__(self, lr: float = 0.05):  # LightningCLI reads the signature
        super().__init__()


def test_lightning_cli_config(tmp_path):
    """The callback from a LightningCLI config file, as docs/porting.md shows it."""
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(f"""\
        trainer:
          accelerator: cpu
          max_epochs: 1
          logger: false
          enable_progress_bar: false
          default_root_dir: {tmp_path}
          callbacks:
            - class_path: ohotorch.lightning.OHOCallback
              init_args:
                every_n_steps: 2
        """))
    cli = LightningCLI(_CLIModel, Data, run=False, save_config_callback=None, args=["--config", str(config)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, OHOCallback)]
    assert callback.every_n_steps == 2
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.optimizers[0].counters["hyper_steps"] == 4 == callback.hyper_steps  # after steps 1, 3, 5, 7


def test_bf16_mixed_precision(tmp_path):
    """precision="bf16-mixed": the validation loss runs under the Trainer's autocast; OHO is told to expect
    bf16 gradients (a warning says so when compute_dtype is missing)."""
    seen = []

    def loss_fn(module, batch):
        x, y = batch
        out = module(x.float())
        seen.append(out.dtype)
        return F.mse_loss(out.float(), y.float())

    class Float32(Tiny):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.net = self.net.float()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self(x.float()).float(), y.float())

    _, val = data()
    for compute_dtype in (None, torch.bfloat16):
        seen.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = Float32(compute_dtype=compute_dtype)
            trainer(tmp_path, [OHOCallback(val, loss_fn=loss_fn)], precision="bf16-mixed").fit(model, data()[0])
        assert any("compute_dtype" in str(w.message) for w in caught) == (compute_dtype is None)
        assert seen == [torch.bfloat16] * 8 and model.trainer.optimizers[0].counters["hyper_steps"] == 8
