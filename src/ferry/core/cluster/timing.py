"""Every timing constant of a cluster node, derived from its lease TTL, in one place.

Theory of operation. etcd deletes a node's ``alive/<node>`` key when the
node's lease expires, by etcd's own clock, ``ttl`` seconds after the last
keepalive *it received*. The leader restarts the node's VMs elsewhere only
after that. A keepalive received by etcd was sent by the node no earlier, so
if the node counts from the *send* time of its last successful renewal, by
its monotonic clock, then "I have not renewed for ``self_fence_s``" is true
before etcd can expire the lease, and the node's QEMUs are dead before any
other node may start them. The margin ``ttl - self_fence_s`` is the time a
SIGKILL and its reaping may take, and absorbs clock-rate error.

Two killers keep that promise, because an agent can die or stall:

- the :class:`~ferry.host.cluster.fencing.LeaseKeeper` in the agent renews
  every ``renew_interval_s`` (each attempt bounded by ``renew_timeout_s``; a
  failed one is retried after ``retry_interval_s``, so a short etcd outage is
  bridged) and fences at ``self_fence_s`` after the last successful send;
- the fence guard, a separate process, is beaten only after a successful
  renewal (so at most ``renew_timeout_s`` after its send) and kills when beats
  stop for ``guard_limit_s``, which therefore ends no later than the
  self-fence deadline: ``guard_limit_s + renew_timeout_s <= self_fence_s``.

The inequalities are checked when the timings are made (as Patroni checks
``loop_wait + 2*retry_timeout <= ttl``); a set that breaks one is refused with
a :class:`~ferry.errors.ConfigError` naming it, never silently corrected.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.errors import ConfigError

# etcd grants no lease shorter than its minimum (1.5 election timeouts, 2 s
# with its defaults) and counts TTLs in whole seconds.
MIN_TTL_S = 2
MAX_TTL_S = 300
DEFAULT_TTL_S = 10
# How often the guard checks its beats, at most (it also wakes on each line).
GUARD_TICK_S = 0.05


@dataclass(frozen=True)
class ClusterTimings:
    """How a node keeps its lease and when it fences itself; see the module docstring."""

    ttl_s: int  # the lease's TTL, as granted by etcd
    renew_interval_s: float  # how often the keeper renews
    renew_timeout_s: float  # how long one renewal may take before it counts as failed
    retry_interval_s: float  # after a failed renewal, the next attempt comes this soon
    self_fence_s: float  # no successful renewal sent for this long: kill our QEMUs
    guard_limit_s: float  # the guard kills when beats stop for this long
    leader_poll_s: float  # how often the leader looks for expired nodes
    loop_lag_limit_s: float  # an event-loop stall longer than this is reported

    def __post_init__(self) -> None:
        checks = [
            (MIN_TTL_S <= self.ttl_s <= MAX_TTL_S,
             f"the lease TTL must be {MIN_TTL_S}..{MAX_TTL_S} s"),
            (min(self.renew_interval_s, self.renew_timeout_s, self.retry_interval_s,
                 self.leader_poll_s, self.loop_lag_limit_s) > 0,
             "every interval must be positive"),
            (self.retry_interval_s <= self.renew_interval_s,
             "retry interval <= renew interval"),
            (0 < self.guard_limit_s < self.self_fence_s,
             "guard limit < self-fence deadline"),
            (self.self_fence_s < self.ttl_s, "self-fence deadline < lease TTL"),
            (self.renew_interval_s * 2 < self.self_fence_s,
             "renew interval * 2 < self-fence deadline (two renewals before fencing)"),
            (self.guard_limit_s + self.renew_timeout_s <= self.self_fence_s,
             "guard limit + renew timeout <= self-fence deadline"),
            (self.loop_lag_limit_s < self.ttl_s - self.self_fence_s,
             "loop-lag limit < lease TTL - self-fence deadline"),
        ]  # fmt: skip
        for holds, rule in checks:
            if not holds:
                raise ConfigError(f"unsafe cluster timings ({self.describe()}): need {rule}")

    @classmethod
    def from_ttl(cls, ttl_s: int) -> ClusterTimings:
        """The timings for a lease of ``ttl_s`` seconds (``cluster_lease_ttl``)."""
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int):
            raise ConfigError(f"the cluster lease TTL must be whole seconds, not {ttl_s!r}")
        if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise ConfigError(
                f"the cluster lease TTL must be {MIN_TTL_S}..{MAX_TTL_S} s, not {ttl_s}"
            )
        renew = ttl_s / 4
        # A keepalive on a healthy etcd takes milliseconds; one slower than this
        # counts as failed (and is retried sooner than the next renewal).
        renew_timeout = ttl_s / 8
        # The time a SIGKILL and its reaping may take before etcd could expire us.
        margin = max(0.5, ttl_s / 5)
        self_fence = ttl_s - margin
        return cls(
            ttl_s=ttl_s,
            renew_interval_s=renew,
            renew_timeout_s=renew_timeout,
            retry_interval_s=ttl_s / 16,
            self_fence_s=self_fence,
            guard_limit_s=self_fence - renew_timeout,
            leader_poll_s=renew,
            loop_lag_limit_s=margin / 2,
        )

    def describe(self) -> str:
        return (
            f"ttl {self.ttl_s}s, renew every {self.renew_interval_s:g}s "
            f"(timeout {self.renew_timeout_s:g}s, retry {self.retry_interval_s:g}s), "
            f"self-fence {self.self_fence_s:g}s, "
            f"guard {self.guard_limit_s:g}s, loop lag {self.loop_lag_limit_s:g}s"
        )
