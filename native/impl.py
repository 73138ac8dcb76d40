"""The implementation switch: each compiled kernel module when built, else its twin.

Kernel modules come in pairs: ``native/_<name>.pyx`` (Cython) and ``native/<name>_py.py``
(the pure-Python twin and the reference, bit-identical). ``CITYGW_PURE_PYTHON=1`` (any
value but empty or "0") forces the twins, e.g. to compare results or on a box without a
compiler. Callers get kernels through ``kernels(name)``, never by importing ``_<name>``
or ``<name>_py`` directly, so the choice is made in one place.
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING

#: every kernel module pair, by name
MODULES = ("kernels", "filters", "aggregate", "alarms", "codec", "codec3", "derive")


def pure_python_forced() -> bool:
    return os.environ.get("CITYGW_PURE_PYTHON", "") not in ("", "0")


def _load(name: str = "kernels") -> tuple[ModuleType, str]:
    """(module, "cython" | "python") for the kernel pair ``name``."""
    if name not in MODULES:
        raise ValueError(f"unknown kernel module {name!r}; known: {', '.join(MODULES)}")
    if not pure_python_forced():
        try:
            return importlib.import_module(f"native._{name}"), "cython"
        except ImportError:
            pass  # not built (no compiler at install time): the twin gives identical results
    return importlib.import_module(f"native.{name}_py"), "python"


@cache
def kernels(name: str) -> ModuleType:
    """The kernel module in use for the pair ``name`` (loaded once)."""
    return _load(name)[0]


def accelerated() -> bool:
    """True when every kernel module in use is the compiled one."""
    return all(_load(name)[1] == "cython" for name in MODULES)


_kernels, IMPLEMENTATION = _load("kernels")

if TYPE_CHECKING:
    # Both modules share these signatures (the tests hold them to it); type by the twin.
    from native.kernels_py import delta_decode, delta_encode, flag_timestamps, range_check
else:
    range_check = _kernels.range_check
    flag_timestamps = _kernels.flag_timestamps
    delta_encode = _kernels.delta_encode
    delta_decode = _kernels.delta_decode

__all__ = [
    "IMPLEMENTATION",
    "MODULES",
    "accelerated",
    "delta_decode",
    "delta_encode",
    "flag_timestamps",
    "kernels",
    "pure_python_forced",
    "range_check",
]
