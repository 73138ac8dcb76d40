"""Codec v2 against general and time-series baselines, on real and synthetic sensor series.

    pip install -e '.[bench]'          (zstandard, pcodec, numpy, vega_datasets)
    python setup.py build_ext --inplace
    python bench/codec.py

Corpus: bench/codec_corpus.py. Each series is cut into single-point batches of 60, 600
and 6000 readings (whole batches only). Per series and batch size:

  ours     native.codec.encode with gateway "gw-0042" and a seq: the whole message,
           header and CRC-32 included; compiled, and the pure twin on fewer batches
           (which must give the same bytes)
  zstd     zstandard level 3 on the raw columns (timestamps int64 + values float64)
  gorilla  bench/codec_gorilla.py, the VLDB 2015 encoding in pure Python
  pcodec   pcodec.standalone on the timestamp column plus on the value column

Every codec's output is decoded and checked bit-exact. Sizes are bytes per reading;
speeds are readings per second over all the batches of one series and size (best of a
few passes). The last line is the summary (geometric means over series and sizes):

  codec: bytes_per_point=... vs_best_baseline=... encode_mpts=... decode_mpts=...

where vs_best_baseline is ours divided by the smallest baseline on the same series and
size. A table of interleaved multi-point batches (hil.datasets.sensor_batch) follows the
per-series table. The whole run takes well under two minutes.
"""

from __future__ import annotations

import importlib
import math
import struct
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import codec_gorilla as gorilla
from bench.codec_corpus import corpus
from hil.datasets import sensor_batch
from native import codec, codec_py
from native.batch import Batch

SIZES = (60, 600, 6000)
GATEWAY = "gw-0042"
POINT = 17
TWIN_POINTS = 1200  # readings per series and size that the pure twin encodes
GORILLA_POINTS = 12_000  # readings per series and size for Gorilla (pure Python, slow)

try:
    import numpy as np
    import zstandard
except ImportError:  # pragma: no cover - the bench extra is missing
    sys.exit("bench/codec.py needs the bench extra: pip install -e '.[bench]'")

try:
    import pcodec.standalone as pco
    from pcodec import ChunkConfig
except ImportError:  # pragma: no cover
    pco = None


def best_time(fn: Callable[[], object], repeat: int) -> float:
    out = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def gmean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


def vbits(values: array[float]) -> bytes:
    return values.tobytes()


def make_batches(ts: array[int], vs: array[float], size: int) -> list[Batch]:
    out = []
    for a in range(0, len(ts) - size + 1, size):
        out.append(
            Batch(
                array("I", [POINT]) * size,
                ts[a : a + size],
                vs[a : a + size],
                array("B", bytes(size)),
            )
        )
    return out


class Result:
    """Bytes and speeds of one codec on one series and batch size."""

    def __init__(self, nbytes: int, points: int, enc: float, dec: float, enc_pts: int) -> None:
        self.bpp = nbytes / points
        self.enc_mpts = enc_pts / enc / 1e6 if enc > 0 else math.nan
        self.dec_mpts = enc_pts / dec / 1e6 if dec > 0 else math.nan


def run_ours(batches: list[Batch], compiled: object) -> tuple[Result, list[bytes]]:
    msgs = [codec.encode(b, gateway=GATEWAY, seq=i) for i, b in enumerate(batches)]
    for b, m in zip(batches, msgs, strict=True):
        d = codec.decode_message(m)
        assert (d.gateway, d.version) == (GATEWAY, 2)
        assert d.batch.timestamps == b.timestamps and vbits(d.batch.values) == vbits(b.values)
    points = sum(len(b) for b in batches)
    repeat = max(3, min(30, 200_000 // points))

    def enc() -> None:
        for i, b in enumerate(batches):
            codec.encode(b, gateway=GATEWAY, seq=i)

    def dec() -> None:
        for m in msgs:
            codec.decode(m)

    e, d = best_time(enc, repeat), best_time(dec, repeat)
    return Result(sum(map(len, msgs)), points, e, d, points), msgs


def run_twin(batches: list[Batch], msgs: list[bytes]) -> Result:
    n = max(1, TWIN_POINTS // len(batches[0]))
    sub, ref = batches[:n], msgs[:n]
    t = time.perf_counter()
    out = [codec.encode(b, gateway=GATEWAY, seq=i, kernels=codec_py) for i, b in enumerate(sub)]
    e = time.perf_counter() - t
    assert out == ref, "the pure twin's bytes differ from the compiled encoder's"
    t = time.perf_counter()
    for m in ref:
        codec.decode(m, kernels=codec_py)
    d = time.perf_counter() - t
    points = sum(len(b) for b in sub)
    return Result(sum(map(len, out)), points, e, d, points)


def run_zstd(batches: list[Batch]) -> Result:
    cctx = zstandard.ZstdCompressor(level=3)
    dctx = zstandard.ZstdDecompressor()
    raws = [b.timestamps.tobytes() + b.values.tobytes() for b in batches]
    blobs = [cctx.compress(r) for r in raws]
    assert [dctx.decompress(x) for x in blobs] == raws
    points = sum(len(b) for b in batches)
    e = best_time(lambda: [cctx.compress(r) for r in raws], 3)
    d = best_time(lambda: [dctx.decompress(x) for x in blobs], 3)
    return Result(sum(map(len, blobs)), points, e, d, points)


def run_gorilla(batches: list[Batch]) -> Result:
    sub = batches[: max(1, GORILLA_POINTS // len(batches[0]))]
    t = time.perf_counter()
    blobs = [gorilla.encode(b.timestamps, b.values) for b in sub]
    e = time.perf_counter() - t
    t = time.perf_counter()
    back = [gorilla.decode(x) for x in blobs]
    d = time.perf_counter() - t
    for b, (ts, vs) in zip(sub, back, strict=True):
        assert ts == b.timestamps and vbits(vs) == vbits(b.values)
    points = sum(len(b) for b in sub)
    return Result(sum(map(len, blobs)), points, e, d, points)


def run_pcodec(batches: list[Batch]) -> Result | None:
    if pco is None:
        return None
    cfg = ChunkConfig()
    cols = [
        (np.frombuffer(b.timestamps, dtype=np.int64), np.frombuffer(b.values, dtype=np.float64))
        for b in batches
    ]

    def enc() -> list[tuple[bytes, bytes]]:
        return [(pco.simple_compress(t, cfg), pco.simple_compress(v, cfg)) for t, v in cols]

    blobs = enc()
    for (t, v), (bt, bv) in zip(cols, blobs, strict=True):
        assert np.array_equal(pco.simple_decompress(bt), t)
        assert pco.simple_decompress(bv).tobytes() == v.tobytes()
    points = sum(len(b) for b in batches)
    e = best_time(enc, 3)
    d = best_time(
        lambda: [(pco.simple_decompress(bt), pco.simple_decompress(bv)) for bt, bv in blobs], 3
    )
    return Result(sum(len(a) + len(b) for a, b in blobs), points, e, d, points)


def multipoint() -> list[str]:
    """Speeds on interleaved polls: sensor_batch(points, polls), 0.1-resolution walks."""
    lines = []
    for npts, polls in ((20, 30), (200, 30), (200, 3), (1000, 6)):
        b = sensor_batch(npts, polls)
        n = len(b)
        m = codec.encode(b, gateway=GATEWAY, seq=1)
        back = codec.decode(m)
        assert sorted(zip(back.point_ids, back.timestamps, back.values, strict=True)) == sorted(
            zip(b.point_ids, b.timestamps, b.values, strict=True)
        )
        repeat = max(5, 100_000 // n)
        e = best_time(lambda b=b: codec.encode(b, gateway=GATEWAY, seq=1), repeat)  # type: ignore[misc]
        d = best_time(lambda m=m: codec.decode(m), repeat)  # type: ignore[misc]
        lines.append(
            f"  {n:5d} readings = {npts:4d} points x {polls:2d} polls: {len(m) / n:6.3f} B/pt "
            f"encode {n / e / 1e6:6.1f} Mpts/s  decode {n / d / 1e6:6.1f} Mpts/s"
        )
    return lines


def main() -> None:
    t_start = time.perf_counter()
    try:
        compiled = importlib.import_module("native._codec")
    except ImportError:
        sys.exit("native._codec is not built: python setup.py build_ext --inplace")
    if codec._codec_kernels() is not compiled:
        sys.exit("native.codec is not using the compiled kernels (CITYGW_PURE_PYTHON set?)")
    series = corpus()
    if len(series) < 7:
        print("note: vega_datasets not installed, real series skipped (pip install '.[bench]')")
    names = ("ours", "twin", "zstd", "gorilla", "pcodec")
    head = (
        f"{'series':13s} {'size':>5s} {'nb':>4s} | "
        + " ".join(f"{n:>8s}" for n in names)
        + " |  ratio | ours enc/dec Mpts/s"
    )
    print("bytes per reading (lower is better); ratio = ours / best baseline")
    print(head)
    print("-" * len(head))
    bpps, ratios, encs, decs = [], [], [], []
    speeds: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for name, ts, vs in series:
        for size in SIZES:
            batches = make_batches(ts, vs, size)
            if not batches:
                continue
            ours, msgs = run_ours(batches, compiled)
            res = {
                "ours": ours,
                "twin": run_twin(batches, msgs),
                "zstd": run_zstd(batches),
                "gorilla": run_gorilla(batches),
            }
            pc = run_pcodec(batches)
            if pc is not None:
                res["pcodec"] = pc
            base = min(r.bpp for k, r in res.items() if k not in ("ours", "twin"))
            ratio = ours.bpp / base
            bpps.append(ours.bpp)
            ratios.append(ratio)
            encs.append(ours.enc_mpts)
            decs.append(ours.dec_mpts)
            for k, r in res.items():
                speeds[k].append((r.enc_mpts, r.dec_mpts))
            cells = " ".join(f"{res[n].bpp:8.3f}" if n in res else f"{'-':>8s}" for n in names)
            print(
                f"{name:13s} {size:5d} {len(batches):4d} | {cells} | {ratio:6.3f} | "
                f"{ours.enc_mpts:6.1f} / {ours.dec_mpts:6.1f}"
            )
    print()
    print("speed, Mpts/s (geometric mean over series and sizes; twin/gorilla on fewer batches)")
    for k in names:
        if speeds[k]:
            e = gmean([s[0] for s in speeds[k]])
            d = gmean([s[1] for s in speeds[k]])
            print(f"  {k:8s} encode {e:8.2f}  decode {d:8.2f}")
    print()
    print("interleaved multi-point batches (compiled):")
    for line in multipoint():
        print(line)
    print(f"\n(run took {time.perf_counter() - t_start:.1f} s)")
    print(
        f"codec: bytes_per_point={gmean(bpps):.3f} vs_best_baseline={gmean(ratios):.2f} "
        f"encode_mpts={gmean(encs):.1f} decode_mpts={gmean(decs):.1f}"
    )


if __name__ == "__main__":
    assert struct.calcsize("q") == 8
    main()
