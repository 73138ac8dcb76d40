"""Both implementations of the native kernels, for tests that must run each."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from native import impl, kernels_py

IMPLEMENTATIONS = ["cython", "python"]


def load_kernels(name: str) -> ModuleType:
    """The kernel module by name. A missing extension fails, unless twins are forced."""
    if name == "python":
        return kernels_py
    if impl.pure_python_forced():
        pytest.skip("CITYGW_PURE_PYTHON is set: compiled kernels not under test")
    try:
        return importlib.import_module("native._kernels")
    except ImportError as exc:
        pytest.fail(
            f"native._kernels is not built ({exc}): run `python setup.py build_ext --inplace`, "
            "or set CITYGW_PURE_PYTHON=1 to test only the pure-Python twins"
        )
