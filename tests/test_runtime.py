"""Real local Ray (shared per test session): start, resources, and a task round trip."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


def test_local_runtime_runs_tasks(ray_local):
    ray = ray_local
    assert ray.is_initialized()
    assert ray.cluster_resources().get("CPU", 0) >= 2

    @ray.remote
    def square(x):
        return x * x

    assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]


def test_init_ray_reuses_the_running_runtime(ray_local):
    from cryoorient_ray.config import RayConfig
    from cryoorient_ray.distributed.runtime import init_ray, ray_runtime

    assert init_ray(RayConfig()) is False
    with ray_runtime(RayConfig()) as resources:
        assert resources["CPU"] >= 2
    assert ray_local.is_initialized()  # a runtime we did not start is left running
