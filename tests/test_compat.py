"""ohotorch.compat: torch.optim's keyword arguments accepted at their defaults, refused otherwise with what
to do, in torch's positional order; every error names the real class."""
import pytest
import torch

import ohotorch
from ohotorch.compat import UNSUPPORTED, check_torch_arguments
from ohotorch.options import Options
from helpers import batches, closures, digits, mlp

ARGUMENTS = {
    ohotorch.OHO: ("maximize", "differentiable", "fused"),
    ohotorch.OHOAdam: ("amsgrad", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"),
    ohotorch.OHOAdamW: ("amsgrad", "maximize", "capturable", "differentiable", "fused"),
}
TORCH = {ohotorch.OHO: torch.optim.SGD, ohotorch.OHOAdam: torch.optim.Adam, ohotorch.OHOAdamW: torch.optim.AdamW}


@pytest.mark.parametrize("cls", list(ARGUMENTS), ids=lambda c: c.__name__)
def test_torch_arguments_are_the_torch_optimizers(cls):
    """The arguments handled here are exactly torch's that OHO does not otherwise take (foreach is an option)."""
    import inspect

    ours = set(inspect.signature(cls.__init__).parameters) | set(Options.names())  # OHOAdam: **options
    theirs = set(inspect.signature(TORCH[cls].__init__).parameters)
    assert theirs - ours == set()
    # torch releases add arguments (Adam's decoupled_weight_decay): every one of this torch's is handled
    assert set(ARGUMENTS[cls]) >= theirs - {"self", "params", "lr", "momentum", "dampening", "weight_decay",
                                            "nesterov", "betas", "eps", "foreach"}


@pytest.mark.parametrize("cls", list(ARGUMENTS), ids=lambda c: c.__name__)
def test_default_values_are_accepted_and_change_nothing(cls):
    """torch's defaults passed explicitly (as HF-style code does) give torch.optim's steps bit for bit."""
    import inspect

    xt, yt, _, _ = digits(torch.float32)
    known = inspect.signature(TORCH[cls].__init__).parameters  # this torch's
    defaults = {name: False for name in ARGUMENTS[cls] if name in known}
    runs = []
    for fused in (None, False):
        for make in (lambda p: TORCH[cls](p, lr=0.01, foreach=False, **dict(defaults, fused=fused)),
                     lambda p: cls(p, lr=0.01, foreach=False, tune=(), **dict(defaults, fused=fused))):
            model = mlp(dtype=torch.float32)
            opt = make(model.parameters())
            for b in batches(xt, yt, 32, 4):
                opt.step(closures(opt, model, b))
            runs.append(model)
    for model in runs[1:]:
        for a, b in zip(runs[0].parameters(), model.parameters()):
            assert torch.equal(a, b)


def test_positional_arguments_follow_torch():
    """SGD(params, lr, momentum, dampening, weight_decay, nesterov);
    Adam(params, lr, betas, eps, weight_decay, amsgrad)."""
    params = list(torch.nn.Linear(3, 2).parameters())
    group = ohotorch.OHO(params, 0.1, 0.9, 0.0, 5e-4, True).param_groups[0]
    reference = torch.optim.SGD(params, 0.1, 0.9, 0.0, 5e-4, True).param_groups[0]
    for name in ("lr", "momentum", "dampening", "weight_decay", "nesterov"):
        assert group[name] == reference[name], name
    for cls in (ohotorch.OHOAdam, ohotorch.OHOAdamW):
        group = cls(params, 0.01, (0.8, 0.9), 1e-6, 0.05, False).param_groups[0]
        reference = TORCH[cls](params, 0.01, (0.8, 0.9), 1e-6, 0.05, False).param_groups[0]
        for name in ("lr", "betas", "eps", "weight_decay"):
            assert group[name] == reference[name], name


@pytest.mark.parametrize("cls, name", [(cls, name) for cls, names in ARGUMENTS.items() for name in names],
                         ids=lambda v: getattr(v, "__name__", v))
def test_other_values_are_refused_with_what_to_do(cls, name):
    with pytest.raises(ValueError, match=rf"^{cls.__name__} does not support {name}=True\. {cls.__name__}\b") as info:
        cls(torch.nn.Linear(3, 2).parameters(), **{name: True})
    assert any(word in str(info.value) for word in ("Pass", "Remove", "use", "Return")), str(info.value)
    with pytest.raises(TypeError, match=rf"{cls.__name__}: {name} must be a bool"):
        cls(torch.nn.Linear(3, 2).parameters(), **{name: "yes"})


def test_adamw_has_no_decoupled_weight_decay_argument():
    with pytest.raises(TypeError, match="OHOAdamW got an unexpected keyword argument 'decoupled_weight_decay'"):
        ohotorch.OHOAdamW(torch.nn.Linear(3, 2).parameters(), decoupled_weight_decay=True)
    with pytest.raises(ValueError, match="use ohotorch.OHOAdamW"):
        ohotorch.OHOAdam(torch.nn.Linear(3, 2).parameters(), decoupled_weight_decay=True)


def test_unknown_arguments():
    with pytest.raises(TypeError, match="OHOAdamW got unexpected keyword arguments: \\['betas2'\\]"):
        ohotorch.OHOAdamW(torch.nn.Linear(3, 2).parameters(), betas2=0.9)
    with pytest.raises(TypeError, match="X got an unexpected keyword argument 'nope'"):
        check_torch_arguments("X", nope=False)
    assert set(UNSUPPORTED) == {name for names in ARGUMENTS.values() for name in names}


@pytest.mark.parametrize("cls", list(ARGUMENTS), ids=lambda c: c.__name__)
def test_errors_name_the_real_class(cls):
    name = cls.__name__
    xt, yt, _, _ = digits(torch.float32)
    model = mlp(dtype=torch.float32)
    opt = cls(model.parameters(), lr=0.01, weight_decay=0.01)
    with pytest.raises(TypeError, match=rf"^{name}\.step\(\) needs a closure"):
        opt.step()
    opt.step(closures(opt, model, (xt[:8], yt[:8])))
    with pytest.raises(ValueError, match=rf"^{name}\.add_param_group after the first step"):
        opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))]))
    scaler_opt = cls(mlp(dtype=torch.float32).parameters(), lr=0.01)
    scaler_opt.grad_scale = torch.ones(())
    with pytest.raises(RuntimeError, match=rf"^{name} cannot run under torch.amp.GradScaler"):
        scaler_opt.step(lambda: torch.zeros(()))
