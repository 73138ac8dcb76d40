"""Codec and range-check throughput for both implementations.

python bench/codec.py          (build first: python setup.py build_ext --inplace)
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hil.datasets import sensor_batch
from native import codec, impl, kernels_py
from native.batch import Batch
from native.pipeline import Pipeline, RangeStage

_KERNELS = (
    "range_check",
    "delta_encode",
    "delta_decode",
)


def best(fn: Callable[[], object], repeat: int = 30) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    batch = sensor_batch()
    n = len(batch)
    pipeline = Pipeline({p: [RangeStage(min=-10.0, max=90.0, action="drop")] for p in range(200)})
    mods = [("python", kernels_py)]
    try:
        mods.insert(0, ("cython", importlib.import_module("native._kernels")))
    except ImportError:
        print("native._kernels not built: pure Python only")
    for name, mod in mods:
        for k in _KERNELS:
            setattr(impl, k, getattr(mod, k))
        for level in (1, 6):
            data = codec.encode(batch, level)
            enc = best(lambda lv=level: codec.encode(batch, lv))  # type: ignore[misc]
            dec = best(lambda d=data: codec.decode(d))  # type: ignore[misc]
            print(
                f"{name:6s} codec L{level}: {n} readings, {len(data) / n:.2f} bytes/reading, "
                f"encode {enc * 1e3:.2f} ms ({n / enc / 1e6:.2f} M/s), "
                f"decode {dec * 1e3:.2f} ms ({n / dec / 1e6:.2f} M/s)"
            )
        rc = best(lambda: pipeline.process(Batch.concat([batch])))
        print(f"{name:6s} range check (incl. copy): {rc * 1e3:.2f} ms ({n / rc / 1e6:.2f} M/s)")


if __name__ == "__main__":
    main()
