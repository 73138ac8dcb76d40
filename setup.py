"""Build script: the package metadata lives in pyproject.toml; this file adds the
Cython extensions of native/. Where no compiler (or no Cython) is available the
build falls back to the pure-Python twins, which give identical results."""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the extensions, but never fail the install because of them."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:
            print(
                f"citygw: Cython extensions not built ({exc}); using pure-Python twins",
                file=sys.stderr,
            )

    def build_extension(self, ext):  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(
                f"citygw: extension {ext.name} not built ({exc}); using its pure-Python twin",
                file=sys.stderr,
            )


def extensions() -> list:
    if os.environ.get("CITYGW_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    sources = sorted(glob.glob(os.path.join("native", "_*.pyx")))
    exts = cythonize(
        sources,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        quiet=True,
    )
    if sys.platform != "win32":
        for ext in exts:
            # No fused multiply-add: a*b+c must round twice, as in the pure-Python twins,
            # or results differ in the last bit on ARM gateways (where FMA is the default).
            ext.extra_compile_args = ["-O2", "-ffp-contract=off"]
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
