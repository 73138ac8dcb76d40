"""The register-map search of `citygw modbus scan` (drivers/modbus/scan.py), sans-I/O:
driven against register images directly (the simulator's `RegisterImage.read` is the
device), so every probe and its outcome are visible.

The field devices (hil/sim_field.py) are an Eastron SDM630 modelled on its published
register table (sources cited there) and a device with a 96-register block."""

from __future__ import annotations

import math
import random

import pytest

from drivers.modbus.scan import (
    GATEWAY_NO_TARGET,
    MapScan,
    Outcome,
    Probe,
    ScanResult,
    merge,
    outcome_of_exception,
)
from drivers.modbus.simulator import RegisterImage
from hil.sim_field import (
    BLOCK_96,
    SDM630_HOLDING_PARAMETERS,
    SDM630_INPUT_PARAMETERS,
    block_device_image,
    sdm630_image,
)

IR, HR = "input_register", "holding_register"
BLOCKS = (1, 2, 3, 7, 10, 16, 40, 64, 125)


def run(image: RegisterImage, table: str, start: int, stop: int, block: int) -> ScanResult:
    """The scan against `image`, every request answered (read or refused)."""
    search = MapScan(start, stop, block, registers=table in (IR, HR))
    for _ in range(10 * (stop - start) + 10):  # bounded: far above the documented bound
        p = search.next_probe()
        if p is None:
            return search.result
        assert start - 1 <= p.address and p.end <= stop + 1, p  # a pair may reach one out
        search.feed(p, "read" if image.read(table, p.address, p.count) is not None else "refused")
    raise AssertionError("the scan did not end")


def bound(start: int, stop: int, block: int) -> int:
    """The module doc's bound: per block 2·block − 1 bisection requests plus a pair per
    register, and 2 alignment checks."""
    blocks = math.ceil((stop - start) / block)
    return blocks * (3 * block - 1) + 2


def documented(starts: tuple[int, ...], lo: int, hi: int) -> list[tuple[int, int]]:
    return merge([(a, a + 2) for a in starts], lo, hi)


@pytest.mark.parametrize("block", BLOCKS)
def test_sdm630_input_registers_are_found_to_the_register(block: int) -> None:
    result = run(sdm630_image(), IR, 0, 400, block)
    assert result.readable == documented(SDM630_INPUT_PARAMETERS, 0, 400)
    # the blocks the technician missed with a 10-register block
    assert (224, 226) in result.readable and (254, 256) in result.readable
    assert result.even_only and result.unanswered == []
    assert result.requests <= bound(0, 400, block)


@pytest.mark.parametrize("block", BLOCKS)
def test_odd_addressed_holding_registers_are_read_as_pairs(block: int) -> None:
    """A scan from address 1 (the technician's 40002 habit): every read of an odd start
    is refused, yet registers 1, 7, 9, ... are readable, as parts of their pairs."""
    result = run(sdm630_image(), HR, 1, 40, block)
    assert result.readable == documented(SDM630_HOLDING_PARAMETERS, 1, 40)
    assert result.readable[0] == (1, 4)
    assert result.even_only
    assert result.requests <= bound(1, 40, block)


def test_the_alignment_rule_is_measured_not_guessed() -> None:
    even = run(sdm630_image(), IR, 0, 100, 10)
    assert (even.even_start, even.even_count) == (True, True)
    image = RegisterImage()  # the same map, any alignment taken
    image.only(IR, documented(SDM630_INPUT_PARAMETERS, 0, 100))
    free = run(image, IR, 0, 100, 10)
    assert free.readable == even.readable
    assert (free.even_start, free.even_count, free.even_only) == (False, False, False)


@pytest.mark.parametrize("block", BLOCKS)
def test_a_96_register_block_gets_its_exact_edges(block: int) -> None:
    result = run(block_device_image(), IR, 1000, 1110, block)
    assert result.readable == [BLOCK_96]
    assert BLOCK_96[1] - BLOCK_96[0] == 96
    assert result.requests <= bound(1000, 1110, block)


def test_bisection_beats_reading_register_by_register_on_a_long_block() -> None:
    result = run(block_device_image(), IR, 1000, 1110, 40)
    assert result.readable == [BLOCK_96]
    assert result.requests < 110 // 2


@pytest.mark.parametrize("seed", range(40))
def test_random_maps_match_the_oracle(seed: int) -> None:
    """Random holes and ranges, even-only or not: the scan finds exactly the addresses
    that can be read (alone, or with their pair on an even-only device)."""
    rng = random.Random(seed)
    image = RegisterImage()
    image.even_only = rng.random() < 0.5
    for _ in range(rng.randrange(0, 12)):
        image.hole(HR, rng.randrange(0, 200), rng.randrange(1, 20))
    start = rng.randrange(0, 20)
    stop = rng.randrange(start + 1, 200)
    block = rng.choice(BLOCKS)

    def alone(a: int) -> bool:
        if not image.even_only:
            return image.read(HR, a, 1) is not None
        return image.read(HR, a & ~1, 2) is not None

    oracle = merge([(a, a + 1) for a in range(start, stop) if alone(a)], start, stop)
    result = run(image, HR, start, stop, block)
    assert result.readable == oracle, (seed, block)
    assert result.requests <= bound(start, stop, block)
    if not image.even_only:
        assert not result.even_only


def test_a_unit_whose_first_request_goes_unanswered_is_absent() -> None:
    search = MapScan(0, 100, 10)
    p = search.next_probe()
    assert p == Probe(0, 10)
    search.feed(p, outcome_of_exception(11))
    assert search.next_probe() is None
    assert search.result.present is False and search.result.requests == 1


@pytest.mark.parametrize(("code", "outcome"), [(10, "silent"), (11, "silent"), (2, "refused"),
                                               (1, "refused"), (4, "refused")])  # fmt: skip
def test_gateway_exceptions_mean_no_answer(code: int, outcome: Outcome) -> None:
    assert outcome_of_exception(code) == outcome
    assert (code in GATEWAY_NO_TARGET) == (outcome == "silent")


def test_silence_after_the_unit_answered_is_unanswered_not_refused() -> None:
    """A timeout in mid-scan says nothing about the addresses: no bisection, reported
    apart from the refusals."""
    search = MapScan(0, 30, 10)
    sent: list[Probe] = []
    while (p := search.next_probe()) is not None:
        sent.append(p)
        search.feed(p, "silent" if p.address == 10 else "read")
    # the alignment checks come as soon as a readable range allows them
    assert sent == [Probe(0, 10), Probe(0, 1), Probe(1, 2), Probe(10, 10), Probe(20, 10)]
    r = search.result
    assert r.readable == [(0, 10), (20, 30)] and r.unanswered == [(10, 20)]
    assert r.requests == 5 and not r.even_only


def test_bit_tables_get_no_pairs_and_no_alignment_checks() -> None:
    image = RegisterImage()
    image.hole("coil", 5, 1)
    search = MapScan(0, 10, 10, registers=False)
    probes = []
    while (p := search.next_probe()) is not None:
        probes.append(p)
        search.feed(p, "read" if image.read("coil", p.address, p.count) is not None else "refused")
    assert search.result.readable == [(0, 5), (6, 10)]
    # the bisection alone: bit 5 refused, and no pair or check after it
    assert probes == [Probe(0, 10), Probe(0, 6), Probe(0, 4), Probe(4, 2), Probe(4, 1),
                      Probe(5, 1), Probe(6, 4)]  # fmt: skip
    assert not search.result.even_only


def test_outcomes_must_follow_their_probe() -> None:
    search = MapScan(0, 20, 10)
    p = search.next_probe()
    assert p is not None
    with pytest.raises(RuntimeError, match="first"):
        search.next_probe()
    with pytest.raises(RuntimeError, match="not the request"):
        search.feed(Probe(10, 10), "read")
    with pytest.raises(ValueError, match="scan range"):
        MapScan(10, 10, 5)
