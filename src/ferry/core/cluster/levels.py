"""A cluster's functional level and the rules of a rolling upgrade, pure.

The cluster's level (``meta.functional_level``) is the configuration version
a new clustered VM gets, so it can run on every node. It starts at the lowest
level of the nodes that made the cluster and changes only by
``cluster upgrade-level``, which raises it to the lowest level of the nodes
once every node runs the newest level (an upgrade node by node ends there);
while one node is older it is refused, naming that node. A node may join when
it runs at least the cluster's level (a newer ferry joins an older cluster;
an older node could not run the cluster's VMs). A VM moves inside the cluster
only to nodes that run its configuration version (see :mod:`.placement`).
"""

from __future__ import annotations

from collections.abc import Mapping

from ferry.errors import InvalidInputError, StateError, VersionError


def lowest_level(levels: Mapping[str, int]) -> int:
    """The level every node runs: the lowest of them."""
    if not levels:
        raise InvalidInputError("a cluster without nodes has no functional level")
    return min(levels.values())


def upgrade_target(cluster: str, current: int, levels: Mapping[str, int]) -> int:
    """The level ``cluster upgrade-level`` raises ``cluster`` to, or why not.

    ``levels`` maps each node (every member, up or not) to its functional level.
    """
    newest = max(levels.values(), default=current)
    older = sorted(node for node, level in levels.items() if level < newest)
    if older and newest > current:
        listed = ", ".join(f"{node} ({levels[node]})" for node in older)
        raise VersionError(
            f"cannot raise cluster {cluster!r} to functional level {newest}: "
            f"{'node' if len(older) == 1 else 'nodes'} {listed} "
            f"{'runs' if len(older) == 1 else 'run'} an older level; upgrade "
            f"{'it' if len(older) == 1 else 'them'} first (drain, upgrade, resume)"
        )
    if newest <= current:
        raise StateError(
            f"cluster {cluster!r} is already at functional level {current}, "
            "the level of its newest node"
        )
    return newest


def check_join(node: str, node_level: int, cluster: str, cluster_level: int) -> None:
    """Refuse a node that could not run the cluster's VMs."""
    if node_level < cluster_level:
        raise VersionError(
            f"host {node!r} runs functional level {node_level}, below cluster {cluster!r}'s "
            f"level {cluster_level}: its VMs could not run there; upgrade the host first"
        )


def config_version_for(requested: int | None, cluster: str, cluster_level: int,
                       newest_node_level: int) -> int:  # fmt: skip
    """The configuration version of a new clustered VM (default: the cluster's level)."""
    if requested is None:
        return cluster_level
    if requested > newest_node_level:
        raise VersionError(
            f"configuration version {requested} runs on no node of cluster {cluster!r} "
            f"(its newest node runs {newest_node_level})"
        )
    return requested
