"""ohotorch.hypergrad.projections: each projection is feasible, idempotent, and satisfies the variational
inequality <y - P(y), z - P(y)> <= 0 for feasible z (which characterises the Euclidean projection)."""
from __future__ import annotations

import pytest
import torch

from ohotorch.hypergrad import (ProjectedAdam, project_box, project_box_budget, project_l1_ball, project_simplex,
                                projected_sgd_step)

DT = torch.float64
TOL = 1e-10


def _feasible_points(kind, shape, gen, count=200):
    """Random points and vertices of each set (the inequality must hold for all of them)."""
    m = int(torch.tensor(shape).prod())
    points = []
    for _ in range(count):
        r = torch.rand(m, generator=gen, dtype=DT)
        if kind == "box":
            points.append(-0.5 + 1.5 * r)
        elif kind == "simplex":
            points.append(2.0 * r / r.sum())
        elif kind == "l1":
            s = torch.randn(m, generator=gen, dtype=DT)
            points.append(1.5 * s / s.abs().sum() * torch.rand((), generator=gen, dtype=DT))
        else:  # box [0, 1] with sum <= 3
            points.append(r * min(1.0, 3.0 / float(r.sum())))
    eye = torch.eye(m, dtype=DT)
    if kind == "simplex":
        points += list(2.0 * eye)
    if kind == "l1":
        points += list(1.5 * eye) + list(-1.5 * eye)
    return [p.reshape(shape) for p in points]


PROJECTIONS = {
    "box": (lambda y: project_box(y, -0.5, 1.0), lambda x: bool(((x >= -0.5 - TOL) & (x <= 1.0 + TOL)).all())),
    "simplex": (lambda y: project_simplex(y, 2.0), lambda x: bool((x >= 0).all()) and abs(float(x.sum()) - 2.0) < TOL),
    "l1": (lambda y: project_l1_ball(y, 1.5), lambda x: float(x.abs().sum()) <= 1.5 + TOL),
    "budget": (lambda y: project_box_budget(y, 0.0, 1.0, 3.0),
               lambda x: bool(((x >= 0) & (x <= 1)).all()) and float(x.sum()) <= 3.0 + TOL),
}


@pytest.mark.parametrize("kind", list(PROJECTIONS))
@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0])
def test_projection_is_feasible_idempotent_and_optimal(kind, scale):
    gen = torch.Generator().manual_seed(0)
    project, feasible = PROJECTIONS[kind]
    for _ in range(5):
        y = scale * torch.randn(3, 4, generator=gen, dtype=DT)
        p = project(y)
        assert p.shape == y.shape and feasible(p)
        assert torch.allclose(project(p), p, atol=1e-12)
        for z in _feasible_points(kind, (3, 4), gen):
            assert float(((y - p) * (z - p)).sum()) <= 1e-9


def test_known_values():
    assert project_simplex(torch.tensor([0.5, 0.5, 3.0], dtype=DT)).tolist() == [0.0, 0.0, 1.0]
    assert torch.allclose(project_simplex(torch.tensor([1.0, 1.0], dtype=DT)), torch.tensor([0.5, 0.5], dtype=DT))
    y = torch.tensor([0.2, -0.3], dtype=DT)
    assert torch.equal(project_l1_ball(y, 1.0), y)  # inside: unchanged
    assert torch.allclose(project_l1_ball(torch.tensor([2.0, -1.0], dtype=DT), 1.0), torch.tensor([1.0, 0.0], dtype=DT))
    assert torch.allclose(project_box_budget(torch.tensor([0.9, 0.8, 2.0], dtype=DT), 0.0, 1.0, 1.5),
                          torch.tensor([0.3, 0.2, 1.0], dtype=DT))
    assert torch.equal(project_box_budget(torch.tensor([0.2, 1.5], dtype=DT), 0.0, 1.0, 5.0),
                       torch.tensor([0.2, 1.0], dtype=DT))


def test_invalid_sets_raise():
    x = torch.zeros(3, dtype=DT)
    with pytest.raises(ValueError, match="radius"):
        project_simplex(x, 0.0)
    with pytest.raises(ValueError, match="radius"):
        project_l1_ball(x, -1.0)
    with pytest.raises(ValueError, match="lo = 2"):
        project_box(x, 2.0, 1.0)
    with pytest.raises(ValueError, match="Empty set"):
        project_box_budget(x, 1.0, 2.0, 2.0)


def test_projected_steps():
    h = {"a": torch.tensor([0.5, 0.5], dtype=DT), "b": torch.tensor(1.0, dtype=DT)}
    g = {"a": torch.tensor([1.0, -1.0], dtype=DT)}
    out = projected_sgd_step(h, g, 1.0, {"a": lambda x: project_box(x, 0.0, 1.0)})
    assert out["a"].tolist() == [0.0, 1.0] and out["b"] is h["b"]
    opt = ProjectedAdam(lr=0.1, projections={"a": lambda x: project_simplex(x, 1.0)})
    new = opt.step(h, g)
    assert abs(float(new["a"].sum()) - 1.0) < 1e-12 and float(new["a"][0]) < 0.5
    with pytest.raises(FloatingPointError):
        opt.step(new, {"a": torch.tensor([float("nan"), 0.0], dtype=DT)})
    assert opt.steps == 1  # the refused step changed nothing
