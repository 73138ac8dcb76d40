"""bench/codec.py's baseline transforms round-trip bit-exactly (a smoke test: the sizes
are the benchmark's business)."""

from __future__ import annotations

import math
from array import array

import numpy as np
import pytest

from bench import codec as bench_codec


def test_decimal_digits() -> None:
    assert bench_codec.decimal_digits(np.array([1.0, 2.0, math.nan])) == 0
    assert bench_codec.decimal_digits(np.array([0.1, 23.45, -7.0])) == 2
    assert bench_codec.decimal_digits(np.array([1.0, math.inf])) is None
    assert bench_codec.decimal_digits(np.array([math.pi])) is None


@pytest.mark.parametrize("values", [[20.5, 20.51, math.nan, 20.49, -3.0], [math.pi, 1e300, -0.0]])
def test_series_measured_and_checked(values: list[float]) -> None:
    n = 130
    vs = array("d", (values * n)[:n])
    ts = array("q", (1_700_000_000_000 + 60_000 * i + (i % 3) for i in range(n)))
    rows = bench_codec.measure(("t", ts, vs))  # every codec's output is decoded and checked
    assert [r.size for r in rows] == list(bench_codec.SIZES)
    for r in rows:
        assert set(r.nbytes) >= {"citygw", "pcodec", "zstd", "xz"}
        assert all(b > 0 for b in r.nbytes.values())
