r"""OHO under Lightning's ``Trainer``: :class:`OHOCallback` draws validation batches and calls ``hyper_step``.

Returning an OHO optimizer from ``configure_optimizers`` is not enough on its own: Lightning calls
``optimizer.step(closure)`` and nothing calls ``hyper_step``, so nothing would be tuned. Add the callback::

    import ohotorch
    from ohotorch.lightning import OHOCallback

    class Model(L.LightningModule):
        def configure_optimizers(self):
    -       return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
    +       return ohotorch.OHO(self.parameters(), lr=0.1, momentum=0.9, module=self)
    +   def oho_val_loss(self, batch):             # the loss OHO's hypergradients minimise
    +       x, y = batch
    +       return F.cross_entropy(self(x), y)

    -trainer = L.Trainer(max_epochs=10)
    +trainer = L.Trainer(max_epochs=10, callbacks=[OHOCallback()])
     trainer.fit(model, datamodule=dm)     # validation batches: dm.val_dataloader(), cycled

**What Lightning's automatic optimisation does with the closure** (lightning 2.x,
``loops/optimization/automatic.py`` and ``plugins/precision/precision.py``). The closure it hands to
``optimizer.step`` runs ``training_step``, then ``zero_grad`` (only on the first batch of an accumulation
window), then ``backward``, then the ``on_before_optimizer_step`` hooks and gradient clipping. OHO needs:

* *grads cleared inside the closure*: OHO starts each re-evaluation from the gradients ``step`` was
  called with, as the first evaluation started, and the closure clears them, so a re-evaluation sees the
  gradient of this closure alone;
* *the closure may run several times a step*: with ``discount > 0`` OHO re-evaluates it once per live
  tangent (twice with ``hvp="central"``) for the finite-difference Hessian-vector products, so
  ``training_step`` and its ``self.log`` calls run up to 1 + K times a step; the step-level value Lightning
  logs is then the last (perturbed) evaluation's, off by O(finite-difference step); epoch means average
  all of them. Dropout masks and (with ``module=``) BatchNorm statistics are replayed exactly. With the
  greedy default (``discount=0``) the closure runs once, exactly as with torch.optim;
* *clipping inside the closure*: Lightning's ``gradient_clip_val`` clips inside it, so every evaluation is
  clipped alike and the step uses the clipped gradient.

**Gradient accumulation** (``Trainer(accumulate_grad_batches=n)``). Lightning runs the first n - 1
micro-batches outside any step and hands ``optimizer.step`` the closure of the last one, which does not
clear the gradient. The first evaluation therefore returns the sum of all n micro-batches (what the step
and the greedy hypergradient use: correct), but a re-evaluation re-runs only the last micro-batch (OHO
starts it from the earlier micro-batches' gradient, which cancels out), so a finite-difference HVP would
carry one micro-batch's curvature instead of the window's. Hence:

* greedy horizon (``discount=0``, the default): no re-evaluation, so accumulation is exact: the tangent
  is ``-u_t`` from the accumulated direction, the hypergradient ``-<grad L_val(w_{t+1}), u_t>``;
* ``discount > 0``: refused with accumulation under automatic optimisation. Use manual optimisation with
  a closure that runs every micro-batch (``docs/porting.md``, "Lightning").

**Manual optimisation** (``self.automatic_optimization = False``) works with the same callback: the
closure you hand to ``self.optimizers().step(closure=...)`` clears the grads, runs every micro-batch
through ``self.manual_backward`` and clips; the callback hyper-steps after every batch on which the OHO
optimizer stepped (it reads ``optimizer.counters["steps"]``).

**Checkpoints.** The optimizer's ``state_dict`` (influence, meta-optimizer state, tuned values) is saved
and restored by Lightning. The callback saves how many validation batches it drew and, on resume through
``trainer.fit(ckpt_path=...)``, skips that many (modulo the loader's length) so that a loader without
shuffling continues where it stopped; a shuffling loader starts a fresh pass order.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch import Tensor

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as error:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "ohotorch.lightning needs Lightning 2.x (the `lightning` package): pip install 'ohotorch[lightning]'"
    ) from error

from .groups import cycle
from .optimizer import OHO

__all__ = ["OHOCallback", "hyperparameter_log"]

LossFn = Callable[["pl.LightningModule", Any], Tensor]


def hyperparameter_log(optimizer: OHO, prefix: str = "oho") -> Dict[str, float]:
    """The values an OHO optimizer tunes, flat, as a logger wants them.

    For each param group: ``lr`` (the group's lr, the scheduled one when a scheduler drives it), every
    tuned name (``lr_scale``, ``weight_decay``, ``momentum``) and, when ``lr_scale`` is tuned,
    ``effective_lr = lr * lr_scale`` (the lr the step actually uses, which ``LearningRateMonitor`` does
    not show). Keys are ``"{prefix}/{name}"`` for a single group, ``"{prefix}/{group}/{name}"``
    otherwise, ``group`` being the group's ``"name"`` or its index.
    """
    values: Dict[str, float] = {}
    groups = optimizer.param_groups
    for index, group in enumerate(groups):
        tuned = tuple(group.get("tune", ()))
        if not tuned:
            continue
        head = prefix if len(groups) == 1 else f"{prefix}/{group.get('name', index)}"
        values[f"{head}/lr"] = float(group["lr"])
        for name in tuned:
            if name != "lr":
                values[f"{head}/{name}"] = float(group[name])
        if "lr_scale" in tuned:
            values[f"{head}/effective_lr"] = float(group["lr"]) * float(group["lr_scale"])
    return values


class OHOCallback(Callback):
    r"""Tunes an OHO optimizer inside ``Trainer.fit``: after every batch on which the optimizer stepped,
    one ``hyper_step`` on the next validation batch.

    Cost: one validation forward and backward per hyper-step (see :class:`ohotorch.OHO` for the step's
    own cost); memory: none beyond the optimizer's.

    Args:
        val_dataloader: the loader (any iterable of batches) the hypergradients are taken on, cycled
            forever with a fresh pass (reshuffle) each time it ends. Default: the datamodule's
            ``val_dataloader()``, else the LightningModule's. Use a held-out split with test-time
            transforms, never the test set; loaders passed to ``fit(val_dataloaders=...)`` are not
            picked up, pass them here.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar Tensor``, the validation loss (with its graph).
            Default: ``pl_module.oho_val_loss(batch)``. It runs under the Trainer's precision context
            (bf16 autocast with ``precision="bf16-mixed"``); it must not call ``self.log``.
        every_n_steps: hyper-step after optimizer steps 1, 1 + n, 1 + 2n, ... (OHO's step count).
        eval_mode: run the validation loss in eval mode (dropout off, BatchNorm running statistics), the
            mode validation metrics use; default train mode, the mode the training steps the
            hypergradient differentiates use (pass ``module=`` to OHO so BatchNorm statistics are not
            updated by validation batches).
        log: log :func:`hyperparameter_log` and the validation loss (``"{prefix}/val_loss"``) after
            every hyper-step, through ``pl_module.log_dict`` (so every logger gets them).
        prog_bar: also show them in the progress bar.
        prefix: the key prefix.

    Distributed (DDP): every rank draws its own validation batch; the callback averages the validation
    gradient over ranks before OHO reads it, so every rank computes the same hyperparameters.
    """

    def __init__(
        self,
        val_dataloader: Optional[Iterable[Any]] = None,
        *,
        loss_fn: Optional[LossFn] = None,
        every_n_steps: int = 1,
        eval_mode: bool = False,
        log: bool = True,
        prog_bar: bool = False,
        prefix: str = "oho",
    ) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"Invalid every_n_steps: {every_n_steps!r} (a positive integer)")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (pl_module, batch) -> loss, got {type(loss_fn).__name__}")
        self.val_dataloader = val_dataloader
        self.loss_fn = loss_fn
        self.every_n_steps = every_n_steps
        self.eval_mode = bool(eval_mode)
        self.log_values = bool(log)
        self.prog_bar = bool(prog_bar)
        self.prefix = prefix
        self.val_batches_drawn = 0
        self.hyper_steps = 0
        self._optimizer: Optional[OHO] = None
        self._iterator: Optional[Iterator[Any]] = None
        self._steps_before: Optional[int] = None

    # ------------------------------------------------------------------ checks at fit start
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        found = [opt for opt in trainer.optimizers if isinstance(opt, OHO)]
        if len(found) != 1:
            names = [type(opt).__name__ for opt in trainer.optimizers]
            raise ValueError(
                f"OHOCallback needs exactly one ohotorch optimizer (OHO, OHOAdam, OHOAdamW) returned by "
                f"configure_optimizers; the Trainer has {names or 'none'}")
        opt = found[0]
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1 and opt.discount > 0.0:
            raise ValueError(
                f"{type(opt).__name__}(discount={opt.discount}) cannot run under Lightning's automatic "
                f"optimisation with accumulate_grad_batches={trainer.accumulate_grad_batches}: Lightning hands "
                "optimizer.step the closure of the last micro-batch only, so the finite-difference Hessian-vector "
                "products (which re-run the closure) would carry one micro-batch's curvature instead of the "
                "window's. Use the greedy default discount=0 (no re-evaluation, exact with accumulation), or "
                "manual optimisation with a closure over every micro-batch (docs/porting.md).")
        precision = str(trainer.precision)
        if "bf16" in precision and opt.compute_dtype is None:
            warnings.warn(
                f"OHOCallback: the Trainer runs precision={precision!r} but {type(opt).__name__} was built "
                "without compute_dtype: pass compute_dtype=torch.bfloat16 so the finite-difference step "
                "matches bf16 gradients")
        if opt.module is None and any(True for _ in pl_module.buffers()):
            warnings.warn(
                f"OHOCallback: the model has buffers (e.g. BatchNorm statistics) but {type(opt).__name__} was "
                "built without module=: pass module=self in configure_optimizers, or the validation batches "
                "(and any re-evaluation) update them")
        self._optimizer = opt

    # ------------------------------------------------------------------ validation batches
    def _resolve_loader(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Iterable[Any]:
        if self.val_dataloader is not None:
            loader: Any = self.val_dataloader
        elif trainer.datamodule is not None and is_overridden("val_dataloader", trainer.datamodule):
            loader = trainer.datamodule.val_dataloader()
        elif is_overridden("val_dataloader", pl_module):
            loader = pl_module.val_dataloader()
        else:
            raise ValueError(
                "OHOCallback found no validation data: pass OHOCallback(val_dataloader=...) or define "
                "val_dataloader() on the datamodule or the LightningModule (use a held-out split, never the test set)")
        if isinstance(loader, (list, tuple)) and len(loader) == 1:
            loader = loader[0]
        if isinstance(loader, (list, tuple, dict)):
            raise ValueError("OHOCallback: val_dataloader() returned several loaders; pass the one OHO should use "
                             "as OHOCallback(val_dataloader=...)")
        return loader

    def _next_val_batch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
        if self._iterator is None:
            loader = self._resolve_loader(trainer, pl_module)
            self._iterator = cycle(loader)
            # Resume: continue the pass where the saved run stopped (exact for a loader without shuffling).
            length = _length(loader)
            for _ in range(self.val_batches_drawn % length if length else 0):
                next(self._iterator)
        batch = next(self._iterator)
        self.val_batches_drawn += 1
        return trainer.strategy.batch_to_device(batch)

    # ------------------------------------------------------------------ the hyper-step
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self._optimizer is not None:
            self._steps_before = self._optimizer.counters["steps"]

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        opt = self._optimizer
        if opt is None or self._steps_before is None:
            return
        steps = opt.counters["steps"]
        if steps == self._steps_before:  # an accumulation batch: the optimizer did not step
            return
        if (steps - 1) % self.every_n_steps != 0:
            return
        self.hyper_step(trainer, pl_module)

    def hyper_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> List[Dict[str, Tensor]]:
        """One ``hyper_step`` of the OHO optimizer on the next validation batch, then logging.

        Called by the callback after each stepping batch; call it yourself only if you drive the
        hyper-steps from your own hook.
        """
        opt = self._optimizer
        if opt is None:
            raise RuntimeError("OHOCallback.hyper_step before on_fit_start: no optimizer found yet")
        batch = self._next_val_batch(trainer, pl_module)
        params = [p for group in opt.param_groups for p in group["params"] if p.requires_grad]
        loss_fn = self.loss_fn or _module_loss
        world = trainer.world_size
        distributed = world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

        def val_closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            with trainer.precision_plugin.forward_context():
                loss = loss_fn(pl_module, batch)
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise TypeError(
                    "OHOCallback: the validation loss must be a scalar Tensor with a graph to the parameters, "
                    f"got {loss if not isinstance(loss, Tensor) else f'a Tensor of shape {tuple(loss.shape)}'}")
            # Gradients of the optimizer's parameters only: nothing else's .grad is touched.
            torch.autograd.backward(loss, inputs=params)
            if distributed:  # the same averaged validation gradient, hence hyperparameters, on every rank
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
            return loss.detach()

        was_training = pl_module.training
        if self.eval_mode:
            pl_module.eval()
        try:
            hyper = opt.hyper_step(val_closure)
        finally:
            pl_module.train(was_training)
        self.hyper_steps += 1
        if self.log_values:
            values = hyperparameter_log(opt, self.prefix)
            val_loss = opt.diagnostics.get("val_loss")
            if val_loss is not None and math.isfinite(val_loss):
                values[f"{self.prefix}/val_loss"] = val_loss
            if values:
                pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=self.prog_bar,
                                   logger=bool(trainer.loggers), batch_size=1)
        return hyper

    # ------------------------------------------------------------------ checkpoints and teardown
    def state_dict(self) -> Dict[str, Any]:
        return {"val_batches_drawn": self.val_batches_drawn, "hyper_steps": self.hyper_steps}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.val_batches_drawn = int(state_dict["val_batches_drawn"])
        self.hyper_steps = int(state_dict["hyper_steps"])
        self._iterator = None

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._iterator = None  # release the loader's workers
        self._steps_before = None


def _module_loss(pl_module: "pl.LightningModule", batch: Any) -> Tensor:
    method = getattr(pl_module, "oho_val_loss", None)
    if method is None:
        raise AttributeError(
            f"OHOCallback needs the validation loss: define {type(pl_module).__name__}.oho_val_loss(self, batch) "
            "returning a scalar loss, or pass OHOCallback(loss_fn=lambda module, batch: ...)")
    return method(batch)


def _length(loader: Any) -> int:
    try:
        return len(loader)
    except TypeError:
        return 0
