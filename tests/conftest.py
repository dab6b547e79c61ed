"""Shared fixtures: one local Ray per test session, and the real structures in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real structures not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (startup costs seconds).

    4 logical CPUs on a 2-core machine: Ray Train workers and Ray Data read tasks each need a
    slot, and with only 2 they starve each other (a measured deadlock).
    """
    ray = pytest.importorskip("ray")
    from cryoorient_ray.config import RayConfig
    from cryoorient_ray.distributed.runtime import init_ray

    started = init_ray(RayConfig(num_cpus=4, num_gpus=0))
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a small shared machine two threads busy-wait against each
    other (measured 5–40× slower). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
