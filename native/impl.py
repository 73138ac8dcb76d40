"""The implementation switch: the compiled kernels when built, else the pure-Python twins.

``CITYGW_PURE_PYTHON=1`` (any value but empty or "0") forces the twins, e.g. to compare
results or on a box without a compiler. Callers use the names below, never
``_kernels`` or ``kernels_py`` directly, so the choice is made in one place.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

from native import kernels_py


def pure_python_forced() -> bool:
    return os.environ.get("CITYGW_PURE_PYTHON", "") not in ("", "0")


def _load() -> tuple[ModuleType, str]:
    if not pure_python_forced():
        try:
            compiled = importlib.import_module("native._kernels")
        except ImportError:
            pass  # not built (no compiler at install time): the twins give identical results
        else:
            return compiled, "cython"
    return kernels_py, "python"


kernels, IMPLEMENTATION = _load()

if TYPE_CHECKING:
    # Both modules share these signatures (the tests hold them to it); type by the twin.
    from native.kernels_py import delta_decode, delta_encode, range_check
else:
    range_check = kernels.range_check
    delta_encode = kernels.delta_encode
    delta_decode = kernels.delta_decode

__all__ = [
    "IMPLEMENTATION",
    "delta_decode",
    "delta_encode",
    "kernels",
    "pure_python_forced",
    "range_check",
]
