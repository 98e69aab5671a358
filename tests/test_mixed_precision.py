"""bf16 autocast, bf16 parameters, and what OHO refuses: fp16 GradScaler and sharded (FSDP) parameters."""
import pytest
import torch
import torch.nn.functional as F

import ohotorch
from helpers import batches, closures, digits, mlp, relative_error


def autocast_closure(opt, model, batch, enabled=True):
    x, y = batch

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def _full_horizon_hypergradient(amp, **options):
    xt, yt, xv, yv = digits(torch.float32)
    model = mlp(dtype=torch.float32)
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, discount=1.0, meta_lr=0.0,
                       **options)
    for b in batches(xt, yt, 32, 10):
        opt.step(autocast_closure(opt, model, b, amp))
    return opt, {k: float(v) for k, v in opt.hypergradient(autocast_closure(opt, model, (xv[:300], yv[:300]), amp))[0].items()}


def test_bf16_autocast_hypergradients_come_close_to_float32():
    """Full horizon (the finite differences matter), tanh MLP on digits: bf16 autocast with its own
    finite-difference step stays within 2% of float32."""
    _, reference = _full_horizon_hypergradient(False)
    opt, bf16 = _full_horizon_hypergradient(True, compute_dtype=torch.bfloat16)
    for name in reference:
        assert relative_error(bf16[name], reference[name]) < 0.02, (name, bf16[name], reference[name])
    for state in opt.state.values():  # the influence stays float32
        assert state["tangent_w"].dtype == torch.float32 and state["tangent_b"].dtype == torch.float32


def test_compute_dtype_sets_the_finite_difference_step(monkeypatch):
    seen = []
    real = ohotorch.optimizer.perturbation_scale
    monkeypatch.setattr(ohotorch.optimizer, "perturbation_scale", lambda w, t, rel: seen.append(rel) or real(w, t, rel))
    _full_horizon_hypergradient(True, compute_dtype=torch.bfloat16)
    assert seen and all(r == ohotorch.finite_differences.LOW_PRECISION_STEP for r in seen)


@pytest.mark.parametrize("foreach", [False, True])
def test_bf16_parameters_keep_a_float32_influence(foreach):
    xt, yt, xv, yv = digits(torch.float32)
    model = mlp(dtype=torch.bfloat16)
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, discount=1.0, foreach=foreach)
    for b, v in zip(batches(xt, yt, 32, 5), batches(xv, yv, 64, 5)):
        opt.step(closures(opt, model, (b[0].bfloat16(), b[1])))
        opt.hyper_step(closures(opt, model, (v[0].bfloat16(), v[1])))
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and opt.state[p]["tangent_w"].dtype == torch.float32
    assert opt.param_groups[0]["lr"] != 0.1 and opt.counters["nonfinite_hypergradients"] == 0


def test_invalid_compute_dtype():
    with pytest.raises(TypeError, match="compute_dtype"):
        ohotorch.OHO(mlp().parameters(), compute_dtype="bf16")
    with pytest.raises(TypeError, match="compute_dtype"):
        ohotorch.OHO(mlp().parameters(), compute_dtype=torch.int8)


def test_grad_scaler_is_refused_with_a_clear_error():
    xt, yt, _, _ = digits(torch.float32)
    model = mlp(dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = ohotorch.OHO(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches(xt, yt, 32, 1)[0]
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="GradScaler"):
        scaler.step(opt)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # nothing moved
    with pytest.raises(RuntimeError, match="Closure use is not currently supported"):  # torch's own
        scaler.step(opt, closure=closures(opt, model, (x, y)))
    with pytest.raises(RuntimeError, match="GradScaler"):  # a closure passed positionally: ours
        scaler.step(opt, closures(opt, model, (x, y)))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    opt.step(closures(opt, model, (x, y)))  # without the scaler, OHO works again


def test_sharded_parameters_are_refused(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        with pytest.raises(TypeError, match="FSDP"):
            ohotorch.OHO([sharded], lr=0.1)
        with pytest.raises(TypeError, match="FSDP"):
            ohotorch.OHOAdamW([sharded], lr=0.1)
    finally:
        dist.destroy_process_group()
