import pytest

from ferry.core.units import format_size, parse_duration, parse_size
from ferry.errors import InvalidInputError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256M", 256 * 1024**2),
        ("1G", 1024**3),
        ("1.5GiB", 1536 * 1024**2),
        ("4096", 4096),
        ("64k", 64 * 1024),
        ("2T", 2 * 1024**4),
        ("10MB", 10 * 1024**2),
    ],
)
def test_sizes_parse(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-1G", "10XB", "", "G", "0", "1.2.3G", "one gig", "0M"])
def test_bad_sizes_are_refused_with_the_input_named(text: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid memory"):
        parse_size(text, what="memory")


def test_format_size_round_trips_common_values() -> None:
    assert format_size(256 * 1024**2) == "256M"
    assert format_size(1536 * 1024**2) == "1.5G"
    assert format_size(512) == "512B"
    for text in ("256M", "1G", "4K"):
        assert format_size(parse_size(text)) == text


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("15m", 900), ("2h", 7200), ("45", 45)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0s", "-5m", "5d", "soon", ""])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidInputError):
        parse_duration(text)


def test_start_times() -> None:
    import datetime as dt

    from ferry.core.units import parse_start_time

    now = dt.datetime(2026, 11, 25, 23, 30, tzinfo=dt.UTC)
    assert parse_start_time("2h", now=now) == now.timestamp() + 7200
    # A time of day already past today means tomorrow.
    assert parse_start_time("01:15", now=now) == dt.datetime(
        2026, 11, 26, 1, 15, tzinfo=dt.UTC).timestamp()  # fmt: skip
    assert parse_start_time("23:45", now=now) == now.timestamp() + 15 * 60
    assert parse_start_time("2026-11-27T02:00", now=now) == dt.datetime(
        2026, 11, 27, 2, 0, tzinfo=dt.UTC).timestamp()  # fmt: skip
    for bad, message in (("yesterday", "invalid start time"), ("25:00", "invalid start time"),
                         ("2026-11-24T02:00", "in the past")):  # fmt: skip
        with pytest.raises(InvalidInputError, match=message):
            parse_start_time(bad, now=now)
