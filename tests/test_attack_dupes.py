"""Hostile input to the new features: filter values, duplicates, moves. Each test was a break."""
from __future__ import annotations

import pytest

from altclip_cli.search.filters import FilterError, parse_distance, parse_filter


def test_a_distance_too_large_for_a_float_is_refused_naming_it():
    text = "1" + "0" * 400 + "km"
    with pytest.raises(ValueError, match="not a distance|too large") as info:
        parse_distance(text)
    assert "1000" in str(info.value)


@pytest.mark.parametrize("within", ["0.0000000000000000000000000001m", "123456789.123456789km", "0.5m"])
def test_a_filter_sent_to_a_server_reads_back_the_same(within):
    where = parse_filter(near="0,0", within=within)
    again = parse_filter(**where.as_request())
    assert again == where
