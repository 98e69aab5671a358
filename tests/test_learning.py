"""OHO with its defaults (no meta-hyperparameter set) moves a poor lr toward better validation loss."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ohotorch
from helpers import closures, digits

EPOCHS = 12


def _train(lr0, tuned, seed=0):
    torch.manual_seed(seed)
    xt, yt, xv, yv = digits(torch.float32)
    xtrain, ytrain, xval, yval = xt[:1000], yt[:1000], xv, yv
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = ohotorch.OHO(model.parameters(), lr=lr0, tune=("lr", "weight_decay") if tuned else ())
    g = torch.Generator().manual_seed(seed)
    val_batches = ohotorch.cycle(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xval, yval), batch_size=64, shuffle=True, generator=g))
    for _ in range(EPOCHS):
        perm = torch.randperm(len(xtrain), generator=g)
        for i in range(0, len(xtrain), 50):
            x, y = xtrain[perm[i:i + 50]], ytrain[perm[i:i + 50]]
            xb, yb = next(val_batches)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            def val_closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
            if tuned:
                opt.hyper_step(val_closure)
    with torch.no_grad():
        val_loss = F.cross_entropy(model(xval), yval).item()
    return val_loss, opt.param_groups[0]["lr"]


@pytest.mark.parametrize("lr0, direction", [(1e-3, "up"), (1.0, "down")])
def test_poor_initial_lr_is_corrected(lr0, direction):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frozen_loss, _ = _train(lr0, tuned=False)
        tuned_loss, lr = _train(lr0, tuned=True)
    print(f"lr0={lr0}: frozen val loss {frozen_loss:.3f}; OHO val loss {tuned_loss:.3f}, final lr {lr:.4f}")
    if direction == "up":
        assert lr > 5 * lr0
    else:  # steps down are halved after the fast phase (lr_down=0.5), so the fall is slower than up
        assert lr < 0.75 * lr0
    assert tuned_loss < frozen_loss


def test_outside_change_restarts_the_meta_optimizer():
    """A user (or scheduler) resets lr mid-run: OHO starts over from the new value instead of staying
    frozen under second moments measured at the old scale."""
    torch.manual_seed(0)
    xt, yt, xv, yv = digits(torch.float32)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = ohotorch.OHO(model.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    for step in range(300):
        idx = torch.randint(0, len(xt), (50,), generator=g)
        vidx = torch.randint(0, len(xv), (50,), generator=g)
        if step == 150:
            opt.param_groups[0]["lr"] = 0.002
        opt.step(closures(opt, model, (xt[idx], yt[idx])))
        if step == 150:
            with pytest.warns(UserWarning, match="changed from outside"):
                opt.hyper_step(closures(opt, model, (xv[vidx], yv[vidx])))
        else:
            opt.hyper_step(closures(opt, model, (xv[vidx], yv[vidx])))
        if step == 150:
            assert opt._bookkeeping.meta_state["0/lr"]["t"] == 1.0  # restarted
    assert opt.param_groups[0]["lr"] > 0.003  # it moves again (1.5x the written value), toward the lr it had found
