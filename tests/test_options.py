"""ohotorch.options: one home for the defaults and checks of the shared options."""
import dataclasses
import inspect

import pytest
import torch

import ohotorch
from ohotorch import meta
from ohotorch.options import Options, canonical_tune


def test_oho_signature_defaults_are_the_options_defaults():
    signature = inspect.signature(ohotorch.OHO.__init__)
    for field in dataclasses.fields(Options):
        assert signature.parameters[field.name].default == field.default, field.name


def test_normalised_values():
    options = Options()
    assert options.meta_lr == {name: 0.02 for name in meta.HYPERPARAMETERS}
    assert options.bounds == meta.DEFAULT_BOUNDS
    assert Options(meta_lr={"lr": 0.1}).meta_lr == {**options.meta_lr, "lr": 0.1}  # adam/log: defaults fill in
    assert Options(meta_lr=0.3).meta_lr == {name: 0.3 for name in meta.HYPERPARAMETERS}


def test_partial_meta_lr_without_a_default_is_not_filled():
    options = Options(meta_optimizer="sgd", space="raw", meta_lr={"lr": 1e-3})
    assert options.meta_lr == {"lr": 1e-3}
    options.check_tuned(("lr",))
    with pytest.raises(ValueError, match=r"meta_lr has no value for \['weight_decay'\]"):
        options.check_tuned(("lr", "weight_decay"))


@pytest.mark.parametrize("cls", [ohotorch.OHO, ohotorch.OHOAdam, ohotorch.OHOAdamW])
def test_optimizers_refuse_a_partial_meta_lr_without_default(cls):
    params = torch.nn.Linear(3, 2).parameters()
    with pytest.raises(ValueError, match=r"meta_lr has no value for \['weight_decay'\]"):
        cls(params, weight_decay=1e-2, meta_optimizer="sgd", space="raw", meta_lr={"lr": 1e-3})
    opt = cls(torch.nn.Linear(3, 2).parameters(), meta_optimizer="sgd", space="raw",
              meta_lr={"lr": 1e-3, "weight_decay": 1e-4})
    assert opt.meta_lr == {"lr": 1e-3, "weight_decay": 1e-4}
    opt = cls(torch.nn.Linear(3, 2).parameters(), meta_optimizer="sgd", space="raw", meta_lr={"lr": 1e-3},
              tune=("lr",))
    assert opt.meta_lr == {"lr": 1e-3}


def test_options_read_as_attributes():
    opt = ohotorch.OHO(torch.nn.Linear(3, 2).parameters(), discount=0.5, hvp="central")
    assert opt.discount == 0.5 and opt.hvp == "central" and opt.options.discount == 0.5
    assert opt.bounds == meta.DEFAULT_BOUNDS and opt.meta_betas == (0.9, 0.999)


def test_canonical_tune():
    assert canonical_tune(["weight_decay", "lr"]) == ("lr", "weight_decay")
    assert canonical_tune("lr") == ("lr",)
    with pytest.raises(ValueError, match="Unknown hyperparameter in tune"):
        canonical_tune(("momentum",), ("lr",))
    with pytest.raises(TypeError, match="tune"):
        canonical_tune(3)
