"""A token bucket: how long to wait before sending bytes under a bandwidth cap.

Pure: the caller passes the clock. One bucket is shared by every replication
stream of a host, so the cap holds for their sum; a stream asks before each
chunk and sleeps for the answer. The burst is one second's worth of bytes.
"""

from __future__ import annotations


class TokenBucket:
    def __init__(self, bytes_per_s: int, *, now: float) -> None:
        """``bytes_per_s`` 0 means no cap."""
        self.rate = bytes_per_s
        self._tokens = float(bytes_per_s)
        self._at = now

    def reserve(self, nbytes: int, now: float) -> float:
        """Take ``nbytes`` now; return the seconds to wait before sending them."""
        if self.rate <= 0:
            return 0.0
        self._tokens = min(float(self.rate), self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate
