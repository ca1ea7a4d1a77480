"""The QEMU guest agent's wire format and when replication freezes a guest (pure, no I/O).

Theory of operation. The guest agent (``qemu-ga`` in the guest) speaks
QMP-like JSON over a virtio-serial port, which QEMU exposes on the host as a
unix socket (``--guest-agent``). Unlike QMP there is no greeting and no
session: the channel is a byte pipe that outlives any one client, so a
reply meant for an earlier client (one that timed out, or died) may still be
in it. A client therefore synchronises first:

1. it sends the byte ``0xFF`` (the agent's JSON parser resets on it) and
   ``{"execute": "guest-sync-delimited", "arguments": {"id": N}}`` with a
   fresh random ``N``;
2. the agent answers with ``0xFF`` followed by ``{"return": N}``;
3. the client drops every byte before that ``0xFF`` and every reply before
   the one whose ``return`` is ``N``. From then on replies come in order,
   one JSON object per line.

Commands are ``{"execute": NAME, "arguments": {...}}`` (arguments omitted
when empty); a reply is ``{"return": VALUE}`` or ``{"error": {"class",
"desc"}}``. ``guest-shutdown`` sends no reply when it works: the guest goes.

:class:`ReplyReader` is the receiving half as a state machine fed with
bytes (tested with plain bytes, like h11); :func:`freeze_due` decides which
replication cycle freezes the guest's file systems.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ferry.core.units import parse_duration
from ferry.errors import GuestAgentError, InvalidInputError

if TYPE_CHECKING:
    from ferry.core.spec import VmSpec

CHANNEL_NAME = "org.qemu.guest_agent.0"  # the virtio-serial port name qemu-ga opens
DELIMITER = 0xFF
MAX_LINE = 1 << 20  # a reply longer than this is not the agent's


def encode_command(command: str, arguments: dict[str, Any] | None = None) -> bytes:
    """One command as the agent reads it: a JSON object and a newline."""
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def encode_sync(sync_id: int) -> bytes:
    """The delimiter that resets the agent's parser, then ``guest-sync-delimited``."""
    return bytes([DELIMITER]) + encode_command("guest-sync-delimited", {"id": sync_id})


@dataclass(frozen=True)
class Reply:
    """One reply: ``value`` on success, else the agent's ``error_class`` and ``desc``."""

    value: Any = None
    error_class: str = ""
    desc: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_class


class ReplyReader:
    """Turns the bytes of the channel into replies, after a sync.

    Call :meth:`expect_sync` when the sync request was sent; bytes up to the
    agent's ``0xFF`` are then dropped, and replies up to the sync's own
    (``{"return": id}``) too. :meth:`feed` returns the replies that followed.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._sync_id: int | None = None
        self._seen_delimiter = False

    @property
    def synced(self) -> bool:
        return self._sync_id is None

    def expect_sync(self, sync_id: int) -> None:
        self._sync_id = sync_id
        self._seen_delimiter = False
        self._buffer.clear()

    def feed(self, data: bytes) -> list[Reply]:
        """The replies complete after ``data``.

        Garbage raises :class:`~ferry.errors.GuestAgentError` naming no VM: the
        adapter says which VM and command when it passes it on.
        """
        if self._sync_id is not None and not self._seen_delimiter:
            at = data.find(bytes([DELIMITER]))
            if at < 0:
                return []
            self._seen_delimiter = True
            data = data[at + 1 :]
        self._buffer += data
        replies: list[Reply] = []
        for line in self._lines():
            message = _parse(line)
            if self._sync_id is not None:
                if message.get("return") == self._sync_id:
                    self._sync_id = None  # in step with the agent from here on
                continue  # an earlier client's reply, or the sync itself
            replies.append(_reply(message))
        if len(self._buffer) > MAX_LINE:
            raise GuestAgentError(f"a reply of more than {MAX_LINE} bytes")
        return replies

    def _lines(self) -> Iterator[bytes]:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return
            line = bytes(self._buffer[:end]).strip()
            del self._buffer[: end + 1]
            if self._sync_id is not None and bytes([DELIMITER]) in line:
                # Another sync's delimiter: what follows it is newer.
                line = line.rpartition(bytes([DELIMITER]))[2].strip()
            if line:
                yield line


def _parse(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise GuestAgentError(f"not JSON: {line[:80]!r}") from exc
    if not isinstance(message, dict):
        raise GuestAgentError(f"not a JSON object: {line[:80]!r}")
    return message


def _reply(message: dict[str, Any]) -> Reply:
    if "return" in message:
        return Reply(value=message["return"])
    error = message.get("error")
    if isinstance(error, dict):
        return Reply(error_class=str(error.get("class") or "GenericError"),
                     desc=str(error.get("desc") or ""))  # fmt: skip
    raise GuestAgentError(f"neither a return nor an error: {json.dumps(message)[:80]}")


# --------------------------------------------------------------------------- freeze schedule


def freeze_due(every_s: int | None, last_attempt: float | None, now: float) -> bool:
    """Whether the cycle starting at ``now`` freezes the guest for an app-consistent point.

    ``every_s`` is ``--app-consistent-every`` (None: never). The first cycle
    after it is set freezes; after that one cycle per interval, counted from
    the last *attempt*, so a guest whose freeze fails is asked again one
    interval later rather than at every cycle (each failure is counted, and a
    guest that cannot freeze should not be stalled by a try every 30 s).
    Hyper-V's ``VSSSnapshotFrequencyHour`` works the same way.
    """
    if every_s is None or every_s <= 0:
        return False
    if last_attempt is None or now < last_attempt:
        return True  # never tried, or the clock went back: do not wait for it to catch up
    return now - last_attempt >= every_s


MAX_APP_CONSISTENT_EVERY_S = 7 * 24 * 3600


def parse_app_consistent_every(text: str) -> int:
    """``--app-consistent-every``: seconds in ``1h``, ``30m``, ...; ``off`` is 0."""
    if text.strip().lower() in ("off", "0", "never"):
        return 0
    seconds = parse_duration(text, what="--app-consistent-every")
    if seconds > MAX_APP_CONSISTENT_EVERY_S:
        raise InvalidInputError(f"--app-consistent-every {text!r} is more than 7 days")
    return seconds


def check_app_consistent_every(seconds: int | None, spec: VmSpec) -> int | None:
    """The interval to store (None: off), or one line if the VM cannot be frozen."""
    if seconds is None or seconds == 0:
        return None
    if not 0 < seconds <= MAX_APP_CONSISTENT_EVERY_S:
        raise InvalidInputError(f"app-consistent interval {seconds}s is out of range (1s..7d)")
    if not spec.guest_agent:
        raise InvalidInputError(
            f"VM {spec.name!r} has no guest agent channel, so its file systems cannot be "
            "frozen: app-consistent points need a VM created with --guest-agent"
        )
    return seconds


# The guest's writes stall while frozen, so the freeze is bounded: QEMU's
# transaction (the cut) takes milliseconds, and past this the guest is thawed
# whatever happens and the point is only crash-consistent.
MAX_FREEZE_S = 10.0
# Replies the agent needs: ping and thaw are instant, a freeze syncs every
# file system first (seconds on a busy guest).
COMMAND_TIMEOUT_S = 5.0
FREEZE_TIMEOUT_S = 10.0
