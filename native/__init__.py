"""Edge processing on columnar batches: pipeline stages, alarm rules and the codec.

``native.ACCELERATED`` tells whether the compiled (Cython) kernels are in use; the
pure-Python twins give bit-identical results (see ``native.impl``)."""

from __future__ import annotations


def __getattr__(name: str) -> object:
    if name == "ACCELERATED":
        from native.impl import accelerated

        return accelerated()
    raise AttributeError(f"module 'native' has no attribute {name!r}")
