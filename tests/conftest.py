"""Shared fixtures: one local Ray per test session, and the real structures in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray Train's controller collects each worker's ``ray.train.report`` when it polls the workers,
# every 2 s by default, and a worker's second report waits until the first was collected (a
# queue of one). The tests' epochs take a fraction of a second, so each epoch and the end of
# every fit waited for the next poll (measured: reports 1.6 s apart at 2 s, 0.6 s at 0.1 s;
# the fit's end seen 3.5 s vs 0.3 s after the loop returned). Set before Ray starts, so every
# Ray process of the session (Tune trials too) and the CLI subprocesses inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

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
