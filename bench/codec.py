"""citygw's batch codec against baselines configured at their best, on real sensor series.

    pip install -e '.[bench]'   (zstandard, pcodec, numpy and the corpus's data packages)
    python setup.py build_ext --inplace
    python bench/codec.py

Corpus: bench/codec_corpus.py (each real series cited there). The headline figures are
over the real series only; the seeded synthetic series are reported apart.

Message sizes: each series is sent whole (one message; a baseline: one stream) and cut
into consecutive messages of 60, 600 and 6000 readings (the last one shorter; a series
shorter than the size is one message). Every codec gets the same messages, compresses
each on its own (no shared dictionary, no state across messages) and is charged every
byte a decoder needs. Sizes are bytes per reading (B/r).

  citygw   ``native.codec.encode`` of a Batch of the message (one point id, quality GOOD)
           with gateway "gw-0042" and the message's seq, whatever version the codec
           writes: magic, version, gateway id, seq, CRC-32 included
  pcodec   pcodec.standalone.simple_compress at compression level 12 (its best), the
           timestamps (int64 ms) and the values (float64) each as their own column,
           pcodec choosing its mode (float-mult, int-mult...) and delta order itself;
           both standalone blobs counted whole (headers included)
  zstd     zstandard level 22 on one frame of the two transformed columns (below), the
           frame at its smallest (magicless, no checksum, no content size, no dict id:
           the decoder knows the format), plain or with long-distance matching
  xz       LZMA2 at preset 9e (extreme), raw stream (the .xz container's header, index
           and check add about 60 bytes a decoder does not need when the filter chain
           is fixed), dictionary as large as the input
  gorilla  bench/codec_gorilla.py, the VLDB 2015 encoding (count and first timestamp
           in its header); "-" where a delta-of-delta does not fit its 32 bits (monthly
           timestamps in ms), and its geometric means are over the series it encodes

Transformed columns for zstd and xz: timestamps as zigzagged delta or delta-of-delta
(the first one absolute), values as XOR with the previous value's IEEE-754 bits or, when
every finite value of the series is a decimal of k <= 9 digits (the codec's own test),
zigzagged deltas of the scaled integers (``dec``; NaN readings then repeat the previous
integer and a bitmap of them follows); each column byte-shuffled (8 byte planes). The
variant (and zstd's plain/long) is picked per series, size and compressor as the one
with the fewest bytes over all the messages: a per-series configuration, not a per
message flag. The picks are printed (``dod+dec/L``: delta-of-delta, decimal, long).

Every output of every codec is decoded and checked bit-exact (NaN payloads included);
the compiled codec's bytes are also checked against the pure-Python twin's on a few
messages per series.

Speed: citygw encode and decode in million readings a second on one core (the compiled
kernels), over every 600-reading message of the real corpus, best of several passes.

The last line is the summary:

  codec: bytes_ratio_vs_pcodec_600=<X> bytes_ratio_vs_pcodec_whole=<X>
         worst_series_ratio_600=<X> encode_mpts=<X> decode_mpts=<X>

(one line) where the ratios are citygw bytes / pcodec bytes, the geometric mean over the
real series (worst: the largest per-series ratio at 600).
"""

from __future__ import annotations

import importlib
import lzma
import math
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import codec_gorilla as gorilla
from bench.codec_corpus import Series, real_series, synthetic_series
from native import codec
from native.batch import Batch

try:
    import numpy as np
    import pcodec.standalone as pco
    import zstandard
    from pcodec import ChunkConfig
except ImportError:  # pragma: no cover - the bench extra is missing
    sys.exit("bench/codec.py needs the bench extra: pip install -e '.[bench]'")

SIZES: tuple[int | None, ...] = (None, 60, 600, 6000)  # None: the whole series
GATEWAY = "gw-0042"
POINT = 17
SEQ0 = 1000
TWIN_MESSAGES = 2  # 600-reading messages per series that the pure twin re-encodes
PCODEC_LEVEL = 12
ZSTD_LEVEL = 22
XZ_PRESET = 9 | lzma.PRESET_EXTREME
SPEED_REPEAT = 5
NAN_BITS = np.array([math.nan]).view(np.uint64)[0]

Spans = list[tuple[int, int]]


def size_name(size: int | None) -> str:
    return "whole" if size is None else str(size)


def spans(n: int, size: int | None) -> Spans:
    if size is None:
        return [(0, n)]
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def best_time(fn: Callable[[], object], repeat: int) -> float:
    out = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def gmean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


# ---------------------------------------------------------------- citygw


def batches_of(ts: array[int], vs: array[float], cut: Spans) -> list[Batch]:
    return [
        Batch(array("I", [POINT]) * (b - a), ts[a:b], vs[a:b], array("B", bytes(b - a)))
        for a, b in cut
    ]


def run_citygw(batches: list[Batch]) -> list[bytes]:
    msgs = [codec.encode(b, gateway=GATEWAY, seq=SEQ0 + i) for i, b in enumerate(batches)]
    for b, m in zip(batches, msgs, strict=True):
        d = codec.decode_message(m)
        assert (d.gateway, d.version) == (GATEWAY, codec.FORMAT_VERSION)
        assert d.batch.timestamps == b.timestamps
        assert d.batch.values.tobytes() == b.values.tobytes()
    return msgs


def check_twin(batches: list[Batch], msgs: list[bytes]) -> None:
    for i, (b, m) in enumerate(zip(batches[:TWIN_MESSAGES], msgs, strict=False)):
        twin = codec.encode(b, gateway=GATEWAY, seq=SEQ0 + i, implementation="python")
        assert twin == m, "the pure twin's bytes differ from the compiled encoder's"


# ---------------------------------------------------------------- pcodec

PCO_CONFIG = ChunkConfig(compression_level=PCODEC_LEVEL)


def run_pcodec(t: np.ndarray, v: np.ndarray, cut: Spans) -> int:
    total = 0
    for a, b in cut:
        bt = pco.simple_compress(t[a:b], PCO_CONFIG)
        bv = pco.simple_compress(v[a:b], PCO_CONFIG)
        assert np.array_equal(pco.simple_decompress(bt), t[a:b])
        assert pco.simple_decompress(bv).tobytes() == v[a:b].tobytes()
        total += len(bt) + len(bv)
    return total


# ---------------------------------------------------------------- zstd and xz


def zz(x: np.ndarray) -> np.ndarray:
    return ((x << 1) ^ (x >> 63)).view(np.uint64)


def unzz(u: np.ndarray) -> np.ndarray:
    return ((u >> np.uint64(1)).view(np.int64)) ^ -((u & np.uint64(1)).view(np.int64))


def shuffle(a: np.ndarray) -> bytes:
    return a.view(np.uint8).reshape(-1, 8).T.tobytes()


def unshuffle(data: bytes, n: int) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(8, n).T.copy().view(np.uint64).ravel()


def delta(x: np.ndarray) -> np.ndarray:
    return np.diff(x, prepend=np.int64(0))


def decimal_digits(v: np.ndarray) -> int | None:
    """The smallest k <= 9 with every finite value s / 10**k (|s| < 2**53), else None;
    None too when a value is infinite or a NaN other than the canonical one."""
    fin = np.isfinite(v)
    if not np.all(fin | (v.view(np.uint64) == NAN_BITS)):
        return None
    f = v[fin]
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(10):
            s = np.floor(f * 10.0**k + 0.5)
            if np.all(np.abs(s) < 2.0**53) and np.array_equal(
                (s / 10.0**k).view(np.uint64), f.view(np.uint64)
            ):
                return k
    return None


@dataclass
class Columns:
    """One series' columns and its transforms for the byte compressors."""

    t: np.ndarray
    v: np.ndarray
    k: int | None = None
    nan: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    s: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def of(cls, t: np.ndarray, v: np.ndarray) -> Columns:
        c = cls(t, v, decimal_digits(v))
        if c.k is not None:
            c.nan = np.isnan(v)
            s = np.where(c.nan, 0.0, np.floor(v * 10.0**c.k + 0.5)).astype(np.int64)
            idx = np.maximum.accumulate(np.where(c.nan, 0, np.arange(len(v))))
            c.s = s[idx]  # a NaN repeats the previous integer (0 before any)
        return c

    def ts_variants(self) -> tuple[str, ...]:
        return ("delta", "dod")

    def value_variants(self) -> tuple[str, ...]:
        return ("xor",) if self.k is None else ("xor", "dec")

    def payload(self, a: int, b: int, tv: str, vv: str) -> bytes:
        d = delta(self.t[a:b])
        ts = zz(d if tv == "delta" else delta(d))
        if vv == "xor":
            bits = self.v[a:b].view(np.uint64)
            return shuffle(ts) + shuffle(bits ^ np.concatenate(([np.uint64(0)], bits[:-1])))
        out = shuffle(ts) + shuffle(zz(delta(self.s[a:b])))
        if self.nan.any():
            out += np.packbits(self.nan[a:b]).tobytes()
        return out

    def check(self, a: int, b: int, tv: str, vv: str, data: bytes) -> None:
        n = b - a
        d = unzz(unshuffle(data[: 8 * n], n))
        t = np.cumsum(d if tv == "delta" else np.cumsum(d))
        assert np.array_equal(t, self.t[a:b])
        u = unshuffle(data[8 * n : 16 * n], n)
        if vv == "xor":
            v = np.bitwise_xor.accumulate(u).view(np.float64)
        else:
            assert self.k is not None
            v = np.cumsum(unzz(u)) / 10.0**self.k
            if self.nan.any():
                v[np.unpackbits(np.frombuffer(data[16 * n :], np.uint8))[:n].astype(bool)] = (
                    math.nan
                )
        assert v.tobytes() == self.v[a:b].tobytes()


_ZSTD: dict[tuple[int, bool], zstandard.ZstdCompressor] = {}
_UNZSTD = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)


def zstd(data: bytes, long: bool) -> bytes:
    key = (len(data), long)
    c = _ZSTD.get(key)
    if c is None:
        params = zstandard.ZstdCompressionParameters.from_level(
            ZSTD_LEVEL,
            source_size=len(data),
            format=zstandard.FORMAT_ZSTD1_MAGICLESS,
            write_checksum=False,
            write_content_size=False,
            write_dict_id=False,
            enable_ldm=long,
        )
        c = _ZSTD[key] = zstandard.ZstdCompressor(compression_params=params)
    return c.compress(data)


def unzstd(blob: bytes) -> bytes:
    return _UNZSTD.decompressobj().decompress(blob)


def xz_filters(n: int) -> list[dict[str, int]]:
    return [{"id": lzma.FILTER_LZMA2, "preset": XZ_PRESET, "dict_size": max(4096, n)}]


def xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=xz_filters(len(data)))


def unxz(blob: bytes, n: int) -> bytes:
    return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=xz_filters(n))


def run_bytewise(cols: Columns, cut: Spans) -> dict[str, tuple[int, str]]:
    """zstd's and xz's bytes with the best variant of the series and size, and its name."""
    best: dict[str, tuple[int, str]] = {}
    for tv in cols.ts_variants():
        for vv in cols.value_variants():
            payloads = [cols.payload(a, b, tv, vv) for a, b in cut]
            name = f"{'dod' if tv == 'dod' else 'd'}+{vv}"
            for long in (False, True):
                n = sum(len(zstd(p, long)) for p in payloads)
                if "zstd" not in best or n < best["zstd"][0]:
                    best["zstd"] = (n, name + ("/L" if long else ""))
            n = sum(len(xz(p)) for p in payloads)
            if "xz" not in best or n < best["xz"][0]:
                best["xz"] = (n, name)
    for codec_name in ("zstd", "xz"):  # decode the picked variant's output, check it
        name = best[codec_name][1]
        tv = "dod" if name.startswith("dod") else "delta"
        vv = "dec" if "+dec" in name else "xor"
        for a, b in cut:
            p = cols.payload(a, b, tv, vv)
            blob = zstd(p, name.endswith("/L")) if codec_name == "zstd" else xz(p)
            back = unzstd(blob) if codec_name == "zstd" else unxz(blob, len(p))
            assert back == p
            cols.check(a, b, tv, vv, back)
    return best


# ---------------------------------------------------------------- gorilla


def run_gorilla(ts: array[int], vs: array[float], cut: Spans) -> int | None:
    """Gorilla's bytes, or None where a delta-of-delta does not fit its 32 bits (monthly
    timestamps in milliseconds)."""
    total = 0
    for a, b in cut:
        try:
            blob = gorilla.encode(ts[a:b], vs[a:b])
        except ValueError:
            return None
        t, v = gorilla.decode(blob)
        assert t == ts[a:b] and v.tobytes() == vs[a:b].tobytes()
        total += len(blob)
    return total


# ---------------------------------------------------------------- the run

CODECS = ("citygw", "pcodec", "zstd", "xz", "gorilla")


@dataclass
class Row:
    name: str
    n: int
    size: int | None
    nbytes: dict[str, int]
    picks: dict[str, str]

    def bpr(self, c: str) -> float:
        return self.nbytes[c] / self.n if c in self.nbytes else math.nan

    def cell(self, c: str) -> str:
        return f"{self.bpr(c):7.3f}" if c in self.nbytes else f"{'-':>7s}"

    @property
    def ratio(self) -> float:
        return self.nbytes["citygw"] / self.nbytes["pcodec"]


def measure(series: Series) -> list[Row]:
    name, ts, vs = series
    n = len(ts)
    cols = Columns.of(np.frombuffer(ts, np.int64), np.frombuffer(vs, np.float64))
    rows = []
    for size in SIZES:
        cut = spans(n, size)
        batches = batches_of(ts, vs, cut)
        msgs = run_citygw(batches)
        if size == 600:
            check_twin(batches, msgs)
        nbytes = {"citygw": sum(map(len, msgs)), "pcodec": run_pcodec(cols.t, cols.v, cut)}
        picks = {}
        for c, (nb, pick) in run_bytewise(cols, cut).items():
            nbytes[c], picks[c] = nb, pick
        g = run_gorilla(ts, vs, cut)
        if g is not None:
            nbytes["gorilla"] = g
        rows.append(Row(name, n, size, nbytes, picks))
    return rows


def speed(series: list[Series]) -> tuple[float, float]:
    """citygw encode/decode Mpts/s over the 600-reading messages of the series."""
    work = [batches_of(ts, vs, spans(len(ts), 600)) for _, ts, vs in series]
    flat = [b for bs in work for b in bs]
    msgs = [codec.encode(b, gateway=GATEWAY, seq=SEQ0 + i) for i, b in enumerate(flat)]
    points = sum(len(b) for b in flat)

    def enc() -> None:
        for i, b in enumerate(flat):
            codec.encode(b, gateway=GATEWAY, seq=SEQ0 + i)

    def dec() -> None:
        for m in msgs:
            codec.decode(m)

    return points / best_time(enc, SPEED_REPEAT) / 1e6, points / best_time(dec, SPEED_REPEAT) / 1e6


def table(title: str, rows: list[Row]) -> None:
    print(title)
    head = (
        f"  {'series':17s} {'readings':>8s} {'msgs':>5s} | "
        + " ".join(f"{c:>7s}" for c in CODECS)
        + " | citygw/pcodec | zstd pick     xz pick"
    )
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in rows:
        msgs = len(spans(r.n, r.size))
        cells = " ".join(r.cell(c) for c in CODECS)
        print(
            f"  {r.name:17s} {r.n:8d} {msgs:5d} | {cells} | {r.ratio:13.2f} | "
            f"{r.picks['zstd']:13s} {r.picks['xz']}"
        )


def summary(label: str, by_size: dict[int | None, list[Row]]) -> None:
    print(f"{label}: geometric means over the series (B/r; ratio = citygw / pcodec)")
    for size in SIZES:
        rows = by_size[size]
        cells = " ".join(
            f"{c} {gmean([r.bpr(c) for r in rows if c in r.nbytes]):6.3f}" for c in CODECS
        )
        worst = max(rows, key=lambda r: r.ratio)
        print(
            f"  {size_name(size):>5s}: {cells} | ratio {gmean([r.ratio for r in rows]):.2f}"
            f" (worst {worst.ratio:.2f} {worst.name})"
        )


def main() -> None:
    t_start = time.perf_counter()
    try:
        compiled = importlib.import_module("native._codec3")
    except ImportError:
        sys.exit("native._codec3 is not built: python setup.py build_ext --inplace")
    if codec._kernels(codec.FORMAT_VERSION, None) is not compiled:
        sys.exit("native.codec is not using the compiled kernels (CITYGW_PURE_PYTHON set?)")
    real, missing = real_series()
    if missing:
        print(f"note: not installed, their series skipped: {', '.join(missing)}")
    if not real:
        sys.exit("no real series: pip install -e '.[bench]'")
    synth = synthetic_series()
    print(f"codec format version {codec.FORMAT_VERSION}; bytes per reading (lower is better)")
    groups: dict[str, dict[int | None, list[Row]]] = {}
    for label, series in (("real", real), ("synthetic", synth)):
        by_size: dict[int | None, list[Row]] = {s: [] for s in SIZES}
        for s in series:
            for row in measure(s):
                by_size[row.size].append(row)
        groups[label] = by_size
    for label, by_size in groups.items():
        for size in SIZES:
            what = "whole series, one message" if size is None else f"messages of {size}"
            print()
            table(f"{label} series, {what}:", by_size[size])
    print()
    for label, by_size in groups.items():
        summary(label, by_size)
    enc, dec = speed(real)
    print()
    print(
        f"citygw speed on the real corpus at 600-reading messages, one core, compiled: "
        f"encode {enc:.1f} Mpts/s, decode {dec:.1f} Mpts/s"
    )
    real_rows = groups["real"]
    r600 = gmean([r.ratio for r in real_rows[600]])
    rwhole = gmean([r.ratio for r in real_rows[None]])
    worst = max(r.ratio for r in real_rows[600])
    print(f"(run took {time.perf_counter() - t_start:.1f} s)")
    print(
        f"codec: bytes_ratio_vs_pcodec_600={r600:.2f} bytes_ratio_vs_pcodec_whole={rwhole:.2f} "
        f"worst_series_ratio_600={worst:.2f} encode_mpts={enc:.1f} decode_mpts={dec:.1f}"
    )


if __name__ == "__main__":
    main()
