"""The Siamese distance model and the Euclidean baseline (pure torch, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from cryoorient_ray.core.learning.model import (
    EuclideanDistance,
    SiameseDistance,
    SiameseSpec,
    angle_between,
    load_distance_model,
    save_distance_model,
    so3_distance_from_angle,
)
from cryoorient_ray.errors import CryoOrientError

SMALL = {"channels": [4, 8], "n_features": 8}


def test_angle_between_matches_arccos_and_is_safe():
    torch.manual_seed(0)
    a, b = torch.randn(100, 16, dtype=torch.float64), torch.randn(100, 16, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(a, b)
    torch.testing.assert_close(angle_between(a, b), torch.arccos(cos))
    assert float(angle_between(a, 3 * a).max()) < 1e-7
    torch.testing.assert_close(angle_between(a, -a), torch.full((100,), math.pi, dtype=torch.float64))
    x = a.clone().requires_grad_(True)
    angle_between(x, a).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("size", [16, 24, 40])
def test_any_image_size_and_range(size):
    torch.manual_seed(1)
    model = SiameseDistance(SMALL).eval()
    xi, xj = torch.randn(5, size, size), torch.randn(5, size, size)
    d = model(xi, xj)
    assert d.shape == (5,) and torch.all((d >= 0) & (d <= math.pi))
    assert model.embed(xi).shape == (5, 8)
    # the network is symmetric in its two inputs and gives 0 for identical images
    torch.testing.assert_close(model(xj, xi), d)
    assert float(model(xi, xi).max()) < 1e-3
    # intensity scale does not matter (per-image standardisation)
    torch.testing.assert_close(model(3 * xi + 1, xj), d, atol=1e-4, rtol=1e-4)


def test_paper_head_doubles_the_angle():
    torch.manual_seed(2)
    a = SiameseDistance({**SMALL, "head": "angle"}).eval()
    p = SiameseDistance({**SMALL, "head": "paper"}).eval()
    p.load_state_dict(a.state_dict())
    x, y = torch.randn(4, 16, 16), torch.randn(4, 16, 16)
    torch.testing.assert_close(p(x, y), 2 * a(x, y))


def test_so3_head_is_exact_on_rotation_matrix_features():
    """With features vec(R) the "so3" head returns d_q exactly, including large distances that
    the plain angle head cannot represent (only one point on a sphere is at angle π)."""
    from cryoorient_ray.core.geometry.quaternion import quat_distance, unitquat_to_rotmat

    rng = torch.Generator().manual_seed(6)
    q = torch.nn.functional.normalize(torch.randn(300, 4, generator=rng, dtype=torch.float64), dim=1)
    feats = torch.as_tensor(unitquat_to_rotmat(q.numpy())).reshape(300, 9)
    i, j = torch.arange(150), torch.arange(150, 300)
    d_true = torch.as_tensor(quat_distance(q[i].numpy(), q[j].numpy()))
    d_hat = so3_distance_from_angle(angle_between(feats[i], feats[j]))
    torch.testing.assert_close(d_hat, d_true, atol=1e-6, rtol=0)
    assert float(d_true.max()) > 2.8  # the test covers large distances
    # the same through the model's head, finite gradients at d = 0 and d = π
    model = SiameseDistance({**SMALL, "n_features": 9, "head": "so3"})
    torch.testing.assert_close(model.distance(feats[i], feats[j]), d_true, atol=1e-6, rtol=0)
    x = feats[:3].clone().requires_grad_(True)
    y = torch.stack([feats[0], feats[1] * -1.0, feats[2] + 1e-9])
    model.distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("size", [16, 24, 40])
def test_grid_pool_takes_any_size(size):
    torch.manual_seed(7)
    model = SiameseDistance({**SMALL, "pool": "grid", "grid": 2, "hidden": 16, "head": "so3"}).eval()
    xi, xj = torch.randn(5, size, size), torch.randn(5, size, size)
    d = model(xi, xj)
    assert d.shape == (5,) and torch.all((d >= 0) & (d <= math.pi))
    assert model.embed(xi).shape == (5, 8)
    torch.testing.assert_close(model(xj, xi), d)
    with pytest.raises(CryoOrientError, match="pool"):
        SiameseSpec(pool="max")


def test_spec_validation_and_small_images():
    with pytest.raises(CryoOrientError, match="odd"):
        SiameseSpec(kernel_size=4)
    with pytest.raises(CryoOrientError, match="norm"):
        SiameseSpec(norm="layer")
    with pytest.raises(CryoOrientError, match="too small"):
        SiameseDistance({"channels": [4, 8, 16, 32]}).embed(torch.zeros(1, 8, 8))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(3)
    model = SiameseDistance({**SMALL, "norm": "none"})
    xi, xj = torch.randn(32, 16, 16), torch.randn(32, 16, 16)
    target = torch.rand(32) * math.pi
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = torch.mean((model(xi, xj) - target) ** 2)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first


def test_save_load_roundtrip_and_errors(tmp_path):
    torch.manual_seed(4)
    model = SiameseDistance(SMALL).eval()
    save_distance_model(tmp_path / "m.pt", model, extra={"note": "x"})
    back, meta = load_distance_model(tmp_path / "m.pt")
    x, y = torch.randn(3, 16, 16), torch.randn(3, 16, 16)
    torch.testing.assert_close(back(x, y), model(x, y))
    assert meta["note"] == "x" and meta["spec"]["n_features"] == 8
    with pytest.raises(CryoOrientError, match="not found"):
        load_distance_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(CryoOrientError, match="cannot read"):
        load_distance_model(tmp_path / "junk.pt")
    # a file written before the grid pool existed (no "pool" in its spec) loads as the global pool
    old = SiameseDistance({**SMALL, "pool": "global"}).eval()
    save_distance_model(tmp_path / "old.pt", old)
    payload = torch.load(tmp_path / "old.pt", weights_only=False)
    del payload["spec"]["pool"]
    torch.save(payload, tmp_path / "old.pt")
    torch.testing.assert_close(load_distance_model(tmp_path / "old.pt")[0](x, y), old(x, y))
    payload = torch.load(tmp_path / "m.pt", weights_only=False)
    payload["spec"]["channels"] = [4, 8, 16]  # weights from another architecture
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CryoOrientError, match="do not match"):
        load_distance_model(tmp_path / "other.pt")


def test_euclidean_scale_fit():
    torch.manual_seed(5)
    xi, xj = torch.randn(50, 8, 8), torch.randn(50, 8, 8)
    raw = (xi - xj).reshape(50, -1).norm(dim=-1)
    model = EuclideanDistance()
    assert model.fit(xi, xj, 0.25 * raw) == pytest.approx(0.25)
    torch.testing.assert_close(model(xi, xj), 0.25 * raw)
    with pytest.raises(CryoOrientError, match="identical"):
        EuclideanDistance().fit(xi, xi, raw)
