"""The CUDA path: exactness, torch.optim.SGD equivalence with the foreach path, RNG replay. Skipped
without a GPU (the SGD-equivalence battery also runs on CUDA when one is present)."""
import pytest
import torch

import ohotorch
from helpers import batches, closures, digits, mlp, oracle_hypergradients, param_index_groups, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_cuda_hypergradients_match_autograd_float64():
    xt, yt, xv, yv = digits()
    train = [(x.cuda(), y.cuda()) for x, y in batches(xt, yt, 32, 15)]
    val = (xv[:300].cuda(), yv[:300].cuda())
    model = mlp().cuda()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, hvp="central", discount=1.0,
                       meta_lr=0.0, tune=("lr", "weight_decay", "momentum"))
    assert opt._use_foreach(list(model.parameters()))
    hypers = [{n: opt.param_groups[0][n] for n in ("lr", "weight_decay", "momentum")}]
    expected = oracle_hypergradients(model, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     use_buffer=True)
    for b in train:
        opt.step(closures(opt, model, b))
    got = opt.hypergradient(closures(opt, model, val))
    for name, value in expected[0].items():
        assert relative_error(float(got[0][name]), value) < 1e-6


def test_cuda_dropout_rng_is_replayed():
    xt, yt, _, _ = digits(torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10)).cuda()
    ref.load_state_dict(model.state_dict())
    opt = ohotorch.OHO(model.parameters(), lr=0.1, meta_lr=0.0, discount=1.0)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for seed, (x, y) in enumerate(batches(xt, yt, 32, 5)):
        x, y = x.cuda(), y.cuda()
        torch.cuda.manual_seed(seed)
        opt.step(closures(opt, model, (x, y)))
        torch.cuda.manual_seed(seed)
        sgd.step(closures(sgd, ref, (x, y)))
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def _bn_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).cuda()


SYNC_FREE = {
    "greedy": lambda m: ohotorch.OHO(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, module=m),
    "full": lambda m: ohotorch.OHO(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, module=m, discount=1.0),
    "full_central_layerwise": lambda m: ohotorch.OHO(ohotorch.layerwise(m), lr=0.05, momentum=0.9, module=m,
                                                     weight_decay=1e-3, discount=0.9, hvp="central"),
    "adam_greedy": lambda m: ohotorch.OHOAdam(m.parameters(), lr=1e-3, weight_decay=1e-3, module=m),
    "adam_full": lambda m: ohotorch.OHOAdam(m.parameters(), lr=1e-3, weight_decay=1e-3, module=m, discount=1.0),
    "full_growth_cap": lambda m: ohotorch.OHO(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, module=m,
                                              discount=1.0, growth_cap=1.0),
    "growth_cap_layerwise": lambda m: ohotorch.OHO(ohotorch.layerwise(m), lr=0.05, momentum=0.9, module=m,
                                                   weight_decay=1e-3, discount=0.9, growth_cap=1.0),
    "adamw_full_growth_cap": lambda m: ohotorch.OHOAdamW(m.parameters(), lr=1e-3, module=m, discount=1.0,
                                                         growth_cap=1.0),
    "full_growth_cap_average": lambda m: ohotorch.OHO(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3,
                                                      module=m, discount=1.0, growth_cap=1.0, average=3.0),
    "adamw_greedy_average": lambda m: ohotorch.OHOAdamW(m.parameters(), lr=1e-3, module=m, average=3.0),
    "greedy_fast_start": lambda m: ohotorch.OHO(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, module=m,
                                                fast_start=0.05),
    "adamw_fast_start": lambda m: ohotorch.OHOAdamW(m.parameters(), lr=1e-3, module=m, fast_start=0.05),
}


@pytest.mark.parametrize("name", list(SYNC_FREE))
def test_steady_state_step_and_hyper_step_never_sync(name):
    """torch.cuda.set_sync_debug_mode("error") raises on any synchronising call: a steady-state step
    and hyper_step make none. The deferred results then arrive: hyperparameters move, counters count."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 1, 8, 8, generator=g).cuda(), torch.randint(0, 10, (32,), generator=g).cuda())
            for _ in range(4)]
    model = _bn_cnn()
    opt = SYNC_FREE[name](model)

    def closure_of(x, y):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    start = dict(opt.param_groups[0])
    for i in range(3):  # state creation, the first HVPs, the first deferred reads
        opt.step(closure_of(*data[i % 2]))
        opt.hyper_step(closure_of(*data[2 + i % 2]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(4):
            opt.step(closure_of(*data[i % 2]))
            opt.hyper_step(closure_of(*data[2 + i % 2]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert opt.counters["hyper_steps"] == 7 and opt.counters["nonfinite_influence"] == 0
    opt.state_dict()  # settles every pending result
    group = opt.param_groups[0]
    assert group["lr"] != start["lr"] and group["weight_decay"] != start["weight_decay"]
    if "greedy" not in name:
        assert min(opt.diagnostics["influence_norm"].values()) > 0
    if "growth_cap" in name:  # the EMA lives on the device and has seen every tangent
        ema = opt._bookkeeping.growth_ema
        assert ema.is_cuda and bool(torch.isfinite(ema).all())
