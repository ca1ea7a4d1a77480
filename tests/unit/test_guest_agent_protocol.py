"""The guest agent framing (core/guest_agent.py) fed plain bytes, and the freeze schedule."""

from __future__ import annotations

import json

import pytest

from ferry.core.guest_agent import (
    DELIMITER,
    Reply,
    ReplyReader,
    encode_command,
    encode_sync,
    freeze_due,
)
from ferry.errors import GuestAgentError

FF = bytes([DELIMITER])


def test_commands_are_one_json_line_each() -> None:
    assert encode_command("guest-ping") == b'{"execute":"guest-ping"}\n'
    line = encode_command("guest-shutdown", {"mode": "powerdown"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"execute": "guest-shutdown", "arguments": {"mode": "powerdown"}}


def test_sync_starts_with_the_delimiter_that_resets_the_agent() -> None:
    data = encode_sync(42)
    assert data[:1] == FF
    assert json.loads(data[1:]) == {"execute": "guest-sync-delimited", "arguments": {"id": 42}}


def test_everything_before_the_delimiter_and_the_sync_reply_is_dropped() -> None:
    reader = ReplyReader()
    reader.expect_sync(7)
    assert not reader.synced
    # An earlier client's late reply, half a line of garbage, then the agent's answer.
    assert reader.feed(b'{"return": {}}\n{"retu') == []
    assert reader.feed(FF + b'{"return": 7}\n{"return": 3}\n') == [Reply(value=3)]
    assert reader.synced


def test_stale_replies_after_the_delimiter_are_dropped_until_the_sync_id() -> None:
    reader = ReplyReader()
    reader.expect_sync(9)
    # A stale sync answer from an earlier session (another id) precedes ours.
    replies = reader.feed(FF + b'{"return": 1}\n' + FF + b'{"return": 9}\n{"return": "frozen"}\n')
    assert replies == [Reply(value="frozen")]


def test_replies_split_anywhere_come_out_whole_and_in_order() -> None:
    reader = ReplyReader()
    reader.expect_sync(5)
    stream = FF + b'{"return": 5}\n{"return": 1}\n{"error": {"class": "GenericError", ' \
        b'"desc": "no freeze"}}\n{"return": {}}\n'  # fmt: skip
    out: list[Reply] = []
    for i in range(len(stream)):
        out += reader.feed(stream[i : i + 1])
    assert out == [Reply(value=1), Reply(error_class="GenericError", desc="no freeze"),
                   Reply(value={})]  # fmt: skip
    assert out[0].ok and not out[1].ok


def test_garbage_after_the_sync_is_a_framing_error() -> None:
    reader = ReplyReader()
    reader.expect_sync(1)
    reader.feed(FF + b'{"return": 1}\n')
    with pytest.raises(GuestAgentError):
        reader.feed(b"not json\n")
    with pytest.raises(GuestAgentError):
        reader.feed(b'{"neither": 1}\n')
    with pytest.raises(GuestAgentError):
        reader.feed(b"[1, 2]\n")


def test_an_endless_line_is_refused() -> None:
    reader = ReplyReader()
    reader.expect_sync(1)
    reader.feed(FF + b'{"return": 1}\n')
    with pytest.raises(GuestAgentError):
        reader.feed(b"x" * (2 << 20))


@pytest.mark.parametrize(
    ("every", "last", "now", "due"),
    [
        (None, None, 100.0, False),  # not asked for: never
        (0, None, 100.0, False),
        (3600, None, 100.0, True),  # the first cycle after it is set freezes
        (3600, 100.0, 100.0 + 3599, False),  # within the interval: crash-consistent
        (3600, 100.0, 100.0 + 3600, True),  # one interval after the last attempt
        (3600, 100.0, 100.0 + 7300, True),
        (3600, 5000.0, 100.0, True),  # the clock went back: do not wait for it
    ],
)
def test_which_cycle_freezes(every: int | None, last: float | None, now: float, due: bool) -> None:
    assert freeze_due(every, last, now) is due


def test_one_freeze_per_interval_over_a_day_of_cycles() -> None:
    """5-minute cycles with --app-consistent-every 1h: 24 freezes a day, every 12th cycle."""
    last = None
    frozen = []
    for cycle in range(288):
        now = cycle * 300.0
        if freeze_due(3600, last, now):
            frozen.append(cycle)
            last = now
    assert len(frozen) == 24
    assert frozen[:3] == [0, 12, 24]
