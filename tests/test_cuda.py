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
