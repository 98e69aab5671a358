"""Bad input gets a clear error naming the problem."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ohotorch


def _params():
    return nn.Linear(4, 2).parameters()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-0.1), ValueError, "Invalid learning rate"),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate"),
    (dict(weight_decay=-1e-4), ValueError, "Invalid weight_decay"),
    (dict(weight_decay=float("nan")), ValueError, "Invalid weight_decay"),
    (dict(momentum=1.0), ValueError, "Invalid momentum"),
    (dict(momentum=-0.1), ValueError, "Invalid momentum"),
    (dict(nesterov=True), ValueError, "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "Nesterov"),
    (dict(tune=("lr", "beta1")), ValueError, "Unknown hyperparameter in tune: 'beta1'"),
    (dict(tune=5), TypeError, "tune"),
    (dict(tune=("momentum",), dampening=0.5), ValueError, "Cannot tune momentum from 0"),
    (dict(meta_lr=-1.0), ValueError, "Invalid meta_lr"),
    (dict(meta_lr=float("inf")), ValueError, "Invalid meta_lr"),
    (dict(meta_lr={"lr": 0.1, "bogus": 1}), ValueError, "Unknown hyperparameter in meta_lr"),
    (dict(meta_optimizer="rmsprop"), ValueError, "meta_optimizer"),
    (dict(meta_optimizer="sgd"), ValueError, "meta_lr is required"),
    (dict(space="exp"), ValueError, "space"),
    (dict(influence="diagonal"), ValueError, "influence"),
    (dict(hvp="double-backward"), ValueError, "hvp"),
    (dict(discount=1.5), ValueError, "discount"),
    (dict(reset_every=0), ValueError, "reset_every"),
    (dict(fd_rel=0.0), ValueError, "fd_rel"),
    (dict(bounds={"lr": (1.0, 0.1)}), ValueError, "Invalid bounds for lr"),
    (dict(bounds={"momentum": (0.0, 1.0)}), ValueError, "Invalid bounds for momentum"),
    (dict(lr=torch.tensor(0.1)), TypeError, "Tensor"),
    (dict(module="model"), TypeError, "module"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ohotorch.OHO(_params(), **kwargs)


def test_bad_param_group_values_are_named():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ohotorch.OHO([{"params": [model.weight], "lr": -1.0}, {"params": [model.bias]}], lr=0.1)
    with pytest.raises(ValueError, match="Unknown hyperparameter in tune"):
        ohotorch.OHO([{"params": [model.weight], "tune": ("lr", "eps")}], lr=0.1)


def _model_and_closure():
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))

    def make(opt, returns=True):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss if returns else None
        return closure

    return model, make


def test_step_without_closure_while_tuning():
    model, make = _model_and_closure()
    opt = ohotorch.OHO(model.parameters(), lr=0.1)
    make(opt)()
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


def test_hyper_step_before_any_step():
    model, make = _model_and_closure()
    opt = ohotorch.OHO(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="before any step"):
        opt.hyper_step(make(opt))
    with pytest.raises(ValueError, match="before any step"):
        opt.hypergradient(make(opt))


def test_closure_returning_no_loss():
    model, make = _model_and_closure()
    opt = ohotorch.OHO(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="returned no loss"):
        opt.step(make(opt, returns=False))
    opt.step(make(opt))
    with pytest.raises(TypeError, match="returned no loss"):
        opt.hyper_step(make(opt, returns=False))


def test_add_param_group_after_first_step():
    model, make = _model_and_closure()
    opt = ohotorch.OHO([model.weight], lr=0.1)
    opt.step(make(opt))
    with pytest.raises(ValueError, match="add_param_group after the first step"):
        opt.add_param_group({"params": [model.bias]})


def test_groups_helpers_validate():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ohotorch.grouped(model, 0)
    with pytest.raises(ValueError, match="exceeds the number of layers"):
        ohotorch.grouped(model, 3)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ohotorch.layerwise(nn.ReLU())
    with pytest.raises(ValueError, match="no batch"):
        next(ohotorch.cycle([]))
