"""The columnar batch's constructors keep the four columns aligned and typed."""

from __future__ import annotations

import pytest

from native.batch import GOOD, Batch


def test_at_stamps_every_reading_with_one_time_and_good_quality() -> None:
    b = Batch.at(1_700_000_000_123, [3, 1, 2], [1.5, -0.0, 7.0])
    assert list(b.rows()) == [
        (3, 1_700_000_000_123, 1.5, GOOD),
        (1, 1_700_000_000_123, -0.0, GOOD),
        (2, 1_700_000_000_123, 7.0, GOOD),
    ]
    assert len(Batch.at(5, [], [])) == 0


def test_columns_of_different_length_are_refused() -> None:
    with pytest.raises(ValueError, match="columns differ in length"):
        Batch.at(5, [1, 2], [1.0])
