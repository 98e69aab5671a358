"""ohotorch.influence: the tangent layout, norms, scaling and the hypergradient contraction."""
import math

import pytest
import torch

from ohotorch import influence


def _groups():
    a, b, c = (torch.randn(s, dtype=torch.float64) for s in [(3, 2), (4,), (5,)])
    return [{"params": [a, b], "tune": ("lr", "weight_decay"), "name": "body"},
            {"params": [c], "tune": ("lr",)}]


def test_layouts():
    groups = _groups()
    assert influence.tangent_keys(groups, influence="exact", discount=1.0) == [
        (0, "lr"), (0, "weight_decay"), (1, "lr")]
    assert influence.tangent_keys(groups, influence="blockwise", discount=1.0) == [(None, "lr"), (None, "weight_decay")]
    # The greedy horizon couples no groups: exact takes the blockwise layout.
    assert influence.tangent_keys(groups, influence="exact", discount=0.0) == [(None, "lr"), (None, "weight_decay")]
    assert influence.key_name(groups, (0, "lr")) == "body/lr"
    assert influence.key_name(groups, (1, "lr")) == "1/lr"
    assert influence.key_name(groups, (None, "weight_decay")) == "weight_decay"


def test_is_direct():
    groups = _groups()
    assert influence.is_direct(groups, (0, "lr"), 0) and not influence.is_direct(groups, (0, "lr"), 1)
    assert influence.is_direct(groups, (None, "lr"), 1)
    assert not influence.is_direct(groups, (None, "weight_decay"), 1)


@pytest.mark.parametrize("dtype, tangent_dtype", [(torch.float64, torch.float64), (torch.bfloat16, torch.float32)])
def test_ensure_tangents(dtype, tangent_dtype):
    p = torch.ones(3, 2, dtype=dtype)
    state = {}
    influence.ensure_tangents(state, p, 2, ("tangent_b",))
    assert state["tangent_w"].shape == (2, 3, 2) and state["tangent_w"].dtype == tangent_dtype
    assert state["tangent_b"].shape == (2, 3, 2) and not state["tangent_b"].any()
    kept = state["tangent_w"]
    influence.ensure_tangents(state, p, 2, ())
    assert state["tangent_w"] is kept
    empty = {}
    influence.ensure_tangents(empty, p, 0, ("tangent_b",))
    assert empty == {}


def test_norms_scale_and_zero():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    states = [{"tangent_w": torch.randn(2, *p.shape, generator=g, dtype=torch.float64),
               "tangent_b": torch.randn(2, *p.shape, generator=g, dtype=torch.float64)} for p in params]
    pairs = [(p, s["tangent_w"]) for p, s in zip(params, states)]
    norms, weight_norm = influence.tangent_norms(pairs, 2)
    for k in range(2):
        expected = math.sqrt(sum(float((s["tangent_w"][k] ** 2).sum()) for s in states))
        assert norms[k] == pytest.approx(expected, rel=1e-12)
    assert weight_norm == pytest.approx(math.sqrt(sum(float((p ** 2).sum()) for p in params)), rel=1e-12)
    assert influence.tangent_norms([], 2) == ([0.0, 0.0], 0.0)

    before = [s["tangent_b"].clone() for s in states]
    influence.scale_tangents_(states, 0.5)
    assert all(torch.equal(s["tangent_b"], b * 0.5) for s, b in zip(states, before))
    states[0]["tangent_w"][1] = float("nan")
    influence.zero_tangent_(states, 1)
    assert all(not s[k][1].any() and s[k][0].any() for s in states for k in ("tangent_w", "tangent_b"))
    states[1]["tangent_b"].fill_(float("nan"))
    influence.zero_tangents_(states)
    assert all(not t.any() for t in influence.tangent_tensors(states))


@pytest.mark.parametrize("multi_tensor", [False, True], ids=["per_parameter", "multi_tensor"])
@pytest.mark.parametrize("layout", ["exact", "blockwise"])
def test_contraction_is_the_dot_product_per_group(layout, multi_tensor):
    groups = _groups()
    keys = influence.tangent_keys(groups, influence=layout, discount=1.0)
    g = torch.Generator().manual_seed(1)
    state = {p: {"tangent_w": torch.randn(len(keys), *p.shape, generator=g, dtype=torch.float64)}
             for group in groups for p in group["params"]}
    val_grads = {id(p): torch.randn(p.shape, generator=g, dtype=torch.float64)
                 for group in groups for p in group["params"]}
    hyper = influence.contract(groups, state, keys, val_grads, multi_tensor=multi_tensor)

    def dot(params, k):
        return sum(float((state[p]["tangent_w"][k] * val_grads[id(p)]).sum()) for p in params)

    everything = [p for group in groups for p in group["params"]]
    for k, (owner, name) in enumerate(keys):
        if owner is not None:
            assert float(hyper[owner][name]) == pytest.approx(dot(everything, k), rel=1e-12)
        else:
            for index, group in enumerate(groups):
                if name in group["tune"]:
                    assert float(hyper[index][name]) == pytest.approx(dot(group["params"], k), rel=1e-12)
    assert set(hyper[1]) == {"lr"} and set(hyper[0]) == {"lr", "weight_decay"}


@pytest.mark.parametrize("multi_tensor", [False, True], ids=["per_parameter", "multi_tensor"])
def test_contraction_without_gradients_is_zero(multi_tensor):
    groups = _groups()
    keys = influence.tangent_keys(groups, influence="blockwise", discount=1.0)
    hyper = influence.contract(groups, {}, keys, {}, multi_tensor=multi_tensor)
    assert float(hyper[0]["lr"]) == 0.0 and float(hyper[1]["lr"]) == 0.0
    p = groups[0]["params"][0]  # one group contributes, the other reads zero
    state = {p: {"tangent_w": torch.ones(len(keys), *p.shape, dtype=torch.float64)}}
    hyper = influence.contract(groups, state, keys, {id(p): torch.ones_like(p)}, multi_tensor=multi_tensor)
    assert float(hyper[0]["lr"]) == p.numel() and float(hyper[1]["lr"]) == 0.0
    assert hyper[1]["lr"].dtype == torch.float64


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-14), (torch.float32, 1e-6)])
@pytest.mark.parametrize("n_keys", [1, 3])
def test_multi_tensor_contraction_matches_the_per_parameter_one(dtype, tolerance, n_keys):
    """Both forms agree to rounding (relative to the sum of |products|, the scale of either's error), in
    the tangents' dtype, on groups with cancelling signs, zero-size and empty groups."""
    g = torch.Generator().manual_seed(0)
    shapes = [[(64, 3, 3, 3), (64,), (0,)], [], [(10, 512), (10,)]]
    pairs = [[(torch.randn(n_keys, *s, generator=g, dtype=dtype), torch.randn(s, generator=g, dtype=dtype))
              for s in group] for group in shapes]
    got = influence.contract_multi_tensor(pairs, n_keys)
    want = influence._contract_per_parameter(pairs, n_keys)
    for group, a, b in zip(pairs, got, want):
        assert a.dtype == dtype and a.shape == (n_keys,)
        scale = sum(float((t.double() * v.double()).abs().sum()) for t, v in group) or 1.0
        exact = [sum(float((t[k].double() * v.double()).sum()) for t, v in group) for k in range(n_keys)]
        assert all(abs(float(x) - e) <= tolerance * scale for x, e in zip(a, exact))
        assert all(abs(float(x) - e) <= tolerance * scale for x, e in zip(b, exact))


class _FakeCUDA:
    """Stands in for a CUDA tensor in the choice of the contraction's form."""

    def __init__(self, dtype=torch.float32, cuda=True, complex_=False):
        self.dtype, self.is_cuda, self._complex = dtype, cuda, complex_

    def is_complex(self):
        return self._complex


def test_multi_tensor_contraction_is_taken_on_cuda_only():
    t = _FakeCUDA()
    assert influence._multi_tensor_pays([[(t, t)] * 62])
    assert not influence._multi_tensor_pays([[(t, t)]] * (influence.MULTI_TENSOR_CONTRACTION_MAX_GROUPS + 1))
    assert not influence._multi_tensor_pays([[(t, t), (_FakeCUDA(cuda=False), t)]])
    assert not influence._multi_tensor_pays([[(t, t), (_FakeCUDA(torch.float64), t)]])
    assert not influence._multi_tensor_pays([[(_FakeCUDA(complex_=True), t)]])
    assert not influence._multi_tensor_pays([[]])
    cpu = torch.zeros(2, 3)
    assert not influence._multi_tensor_pays([[(cpu, cpu[0])]])


def test_slice_cache_follows_the_tensor_and_forgets_it():
    t = torch.arange(12.0).reshape(3, 2, 2)
    slices = influence.tangent_slices(t)
    assert influence.tangent_slices(t) is slices  # made once
    assert all(torch.equal(s, t[k]) and s.data_ptr() == t[k].data_ptr() for k, s in enumerate(slices))
    assert torch.equal(influence.tangent_matrix(t), t.reshape(3, -1))
    t.set_(torch.zeros(3, 2, 2))  # new memory: the slices are remade
    assert influence.tangent_slice(t, 1).data_ptr() == t[1].data_ptr()
    assert influence.tangent_matrix(t).data_ptr() == t.data_ptr()
    before = len(influence._SLICES)
    u = torch.ones(2, 3)
    influence.tangent_slices(u)
    assert len(influence._SLICES) == before + 1
    del u  # the entry dies with its tensor
    assert len(influence._SLICES) == before


@pytest.mark.parametrize("sync_free", [False, True])
def test_optimizer_with_the_multi_tensor_contraction(monkeypatch, sync_free):
    """The whole optimizer (float64, full horizon, meta_lr = 0 so that both runs take the same steps)
    reads the same hypergradients, to rounding, with the contraction CUDA takes forced on the CPU
    (``_multi_tensor_contraction``, as the host-time benchmark forces it)."""
    import ohotorch

    def run(multi_tensor, foreach=True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, discount=1.0, meta_lr=0.0,
                           foreach=foreach)
        opt._sync_free = sync_free
        opt._multi_tensor_contraction = multi_tensor
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        out = []
        for _ in range(3):
            opt.step(closure)
            out.append({k: float(v) for k, v in opt.hyper_step(closure)[0].items()})
        return out

    calls = []
    real = influence.contract_multi_tensor
    monkeypatch.setattr(influence, "contract_multi_tensor", lambda *a: calls.append(1) or real(*a))
    reference = run(None)  # the CPU's form
    assert not calls
    forced = run(True)
    assert len(calls) == 3
    for a, b in zip(reference, forced):
        assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], rel=1e-12, abs=1e-15) for k in a)
    monkeypatch.setattr(influence, "_multi_tensor_pays", lambda pairs: True)  # as on CUDA
    run(None, foreach=False)  # foreach=False: no multi-tensor op, the contraction's included
    assert len(calls) == 3
    run(None)
    assert len(calls) == 6


def test_slices_at_is_the_cached_slices_of_each_tensor():
    ts = [torch.randn(2, 3), torch.randn(2, 4, 1), torch.randn(2, 0)]
    for k in range(2):
        got = influence.slices_at(ts, k)
        assert all(s is influence.tangent_slice(t, k) and torch.equal(s, t[k]) for s, t in zip(got, ts))
    ts[0].set_(torch.randn(2, 3))  # other memory: the slices follow it
    assert influence.slices_at(ts, 1)[0].data_ptr() == ts[0][1].data_ptr()
