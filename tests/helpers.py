"""Helpers several test files share: both implementations of the native kernels, a
driver run bounded by a condition, and the data-driven malformed-config cases."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agent.config import ConfigError, load_config
from drivers.base import BatchSink, Driver
from native import impl
from native.batch import Batch
from native.table import StageTable

IMPLEMENTATIONS = ["cython", "python"]


def load_kernels(name: str, module: str = "kernels") -> ModuleType:
    """The kernel module pair ``module`` (see native.impl.MODULES) in implementation
    ``name`` ("cython" or "python"). A missing extension fails, unless twins are forced."""
    if name == "python":
        return importlib.import_module(f"native.{module}_py")
    if impl.pure_python_forced():
        pytest.skip("CITYGW_PURE_PYTHON is set: compiled kernels not under test")
    try:
        return importlib.import_module(f"native._{module}")
    except ImportError as exc:
        pytest.fail(
            f"native._{module} is not built ({exc}): run `python setup.py build_ext --inplace`, "
            "or set CITYGW_PURE_PYTHON=1 to test only the pure-Python twins"
        )


def columns(batch: Batch) -> tuple[bytes, bytes, bytes, bytes]:
    """A batch's columns as bytes: equal only if bit-identical (NaN payloads, -0.0)."""
    return (
        batch.point_ids.tobytes(),
        batch.timestamps.tobytes(),
        batch.values.tobytes(),
        batch.quality.tobytes(),
    )


def state_bytes(table: StageTable[Any]) -> dict[str, bytes]:
    """A stage table's state arrays as bytes, by name."""
    return {name: arr.tobytes() for name, (arr, _) in table.state.items()}


async def run_driver_until(
    driver: Driver, sink: BatchSink, done: Callable[[], bool], timeout: float = 10.0
) -> None:
    """Runs the driver until `done()` holds (checked every 5 ms), then cancels it."""
    task = asyncio.create_task(driver.run(sink))
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "driver did not get there in time"
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def check_config_case(folder: Path, monkeypatch: pytest.MonkeyPatch) -> ConfigError:
    """Loads folder/gateway.toml, which must fail with exactly folder/expected.err
    (CITYGW_REGEN_EXPECTED=1 rewrites expected.err instead: read the diff)."""
    monkeypatch.chdir(folder)
    with pytest.raises(ConfigError) as info:
        load_config("gateway.toml")
    actual = str(info.value) + "\n"
    if os.environ.get("CITYGW_REGEN_EXPECTED"):
        (folder / "expected.err").write_text(actual, encoding="utf-8")
    assert actual == (folder / "expected.err").read_text(encoding="utf-8")
    return info.value
