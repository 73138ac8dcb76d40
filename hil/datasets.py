"""Synthetic sensor series with the shape of real city data, for benchmarks and tests."""

from __future__ import annotations

import random

from native.batch import Batch


def sensor_batch(n_points: int = 200, seconds: int = 50, seed: int = 7) -> Batch:
    """Points polled every second (one timestamp per 20-point device poll, with a little
    jitter), random-walk values quantised to 0.1, as most city sensors report them."""
    rng = random.Random(seed)
    level = [rng.uniform(0, 100) for _ in range(n_points)]
    b = Batch()
    t0 = 1_700_000_000_000
    for s in range(seconds):
        for dev in range(0, n_points, 20):
            t = t0 + s * 1000 + rng.randrange(30)
            for p in range(dev, min(dev + 20, n_points)):
                level[p] += rng.gauss(0, 0.2)
                b.append(p, t, round(level[p], 1))
    return b
