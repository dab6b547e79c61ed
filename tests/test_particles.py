"""One particle stack: CTF parameters and images, shifts, pixel size kept in step; read from a store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryoorient_ray.core.imaging.ctf import ctf_2d
from cryoorient_ray.core.imaging.fourier import fourier_crop
from cryoorient_ray.core.imaging.particles import CTF_KEYS, CTFParams, ParticleStack, as_particle_stack
from cryoorient_ray.core.imaging.projection import shift_images
from cryoorient_ray.errors import CryoOrientError
from tests.helpers import make_store


def _ctf(n=5, seed=0):
    rng = np.random.default_rng(seed)
    du = rng.uniform(8000, 20000, n)
    return {"defocus_u": du, "defocus_v": du - 100, "defocus_angle": rng.uniform(0, 180, n), "voltage": 200.0}


def test_ctf_params_round_trip_and_subset():
    params = CTFParams.from_dict(_ctf())
    d = params.to_dict()
    assert set(d) == set(CTF_KEYS) and len(params) == 5
    assert d["voltage"].tolist() == [200.0] and d["cs"].tolist() == [2.7]  # defaults as ctf_2d's
    np.testing.assert_array_equal(d["defocus_u"], _ctf()["defocus_u"])
    sub = params.subset(np.array([3, 1]))
    np.testing.assert_array_equal(sub.defocus_angle, params.defocus_angle[[3, 1]])
    assert sub.voltage.tolist() == [200.0] and len(sub) == 2
    grid = params.grid(16, 2.0, torch.tensor([3, 1]))
    np.testing.assert_array_equal(grid.numpy(), ctf_2d(16, 2.0, **sub.to_dict()).numpy())
    shared = CTFParams.from_dict({"defocus_u": 1e4, "defocus_v": 1e4, "defocus_angle": 0.0})
    assert shared.grid(16, 2.0, torch.arange(3)).shape == (3, 16, 9)


def test_ctf_params_refuse_bad_values():
    with pytest.raises(CryoOrientError, match="unknown CTF"):
        CTFParams.from_dict({**_ctf(), "defocus": 1.0})
    with pytest.raises(CryoOrientError, match="needs defocus_angle"):
        CTFParams.from_dict({"defocus_u": 1e4, "defocus_v": 1e4})
    with pytest.raises(CryoOrientError, match="voltage"):
        CTFParams.from_dict({**_ctf(), "voltage": -1.0})
    with pytest.raises(CryoOrientError, match="batch sizes"):
        CTFParams.from_dict({**_ctf(), "defocus_v": np.ones(3)})


def test_stack_subset_crop_and_centre():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((5, 16, 16)).astype(np.float32)
    shifts = rng.uniform(-2, 2, (5, 2)).astype(np.float32)
    stack = ParticleStack(images, shifts=shifts, ctf=CTFParams.from_dict(_ctf()), pixel_size_A=3.0)
    assert len(stack) == 5 and stack.image_size == 16 and stack.numpy_out
    assert isinstance(stack.images, torch.Tensor) and stack.images.dtype == torch.float32
    part = stack.subset(np.array([4, 0]))
    np.testing.assert_array_equal(part.images.numpy(), images[[4, 0]])
    np.testing.assert_array_equal(part.shifts.numpy(), shifts[[4, 0]])
    np.testing.assert_array_equal(part.ctf.defocus_u, stack.ctf.defocus_u[[4, 0]])
    assert len(stack.subset(np.array([True, False, True, False, False]))) == 2
    small = stack.fourier_crop(8)
    assert small.image_size == 8 and small.pixel_size_A == 6.0 and small.ctf is stack.ctf
    np.testing.assert_allclose(small.shifts.numpy(), shifts / 2)
    np.testing.assert_array_equal(small.images.numpy(), fourier_crop(images, 8).numpy())
    centred = stack.centred()
    assert centred.shifts is None
    np.testing.assert_array_equal(centred.images.numpy(), shift_images(images, -shifts))
    assert as_particle_stack(stack) is stack and len(as_particle_stack(images)) == 5


def test_stack_refuses_bad_input():
    images = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(CryoOrientError, match="square"):
        ParticleStack(np.zeros((4, 8, 7)))
    with pytest.raises(CryoOrientError, match="shifts"):
        ParticleStack(images, shifts=np.zeros((3, 2)))
    with pytest.raises(CryoOrientError, match="pixel_size_A"):
        ParticleStack(images, ctf=CTFParams.from_dict(_ctf(4)))
    with pytest.raises(CryoOrientError, match="5 values for 4 images"):
        ParticleStack(images, ctf=CTFParams.from_dict(_ctf(5)), pixel_size_A=1.0)


def test_store_particles(tmp_path):
    store = make_store(tmp_path / "s.zarr", n_per_protein=20, proteins=("a",))
    rows = np.array([2, 5, 11])
    stack = store.particles(rows)
    meta = store.read_metadata(rows)
    np.testing.assert_array_equal(stack.images.numpy(), store.read_images(rows))
    np.testing.assert_array_equal(stack.shifts.numpy(), meta["shift"])
    np.testing.assert_array_equal(stack.ctf.defocus_u, meta["defocus_u"])
    assert stack.pixel_size_A == store.pixel_size and stack.numpy_out
    plain = make_store(tmp_path / "p.zarr", n_per_protein=20, proteins=("a",), ctf=False).particles(rows)
    assert plain.ctf is None
