"""The rules of moving a VM between clusters (ferry.core.cluster.crossing)."""

from __future__ import annotations

import pytest

from ferry.core.cluster.crossing import (
    check_level,
    check_name_free,
    check_replica_level,
    check_target,
    choose_volume,
    crossed_spec,
    unprotected_s,
)
from ferry.core.spec import DiskSpec, VmSpec
from ferry.errors import ConflictError, InvalidInputError, NotFoundError, VersionError


def test_target_must_be_another_known_cluster() -> None:
    check_target("web", source="c1", target="c2", known=["c1", "c2"])
    with pytest.raises(InvalidInputError, match=r"in cluster 'c1' already.*--to NODE"):
        check_target("web", source="c1", target="c1", known=["c1", "c2"])
    with pytest.raises(
        NotFoundError, match=r"unknown cluster 'c9' \(clusters in this etcd: c1, c2\)"
    ):
        check_target("web", source="c1", target="c9", known=["c2", "c1"])


@pytest.mark.parametrize(
    ("asked", "own", "volumes", "chosen"),
    [
        (None, "csv1", {"csv1": "/a", "csv2": "/b"}, "csv1"),  # its own volume's name
        (None, "csv1", {"fast": "/f"}, "fast"),  # the only one
        ("csv2", "csv1", {"csv1": "/a", "csv2": "/b"}, "csv2"),  # as asked
    ],
)
def test_volume_choice(asked: str | None, own: str, volumes: dict[str, str], chosen: str) -> None:
    assert choose_volume("c2", asked, own, volumes) == chosen


def test_volume_refusals() -> None:
    with pytest.raises(NotFoundError, match=r"cluster 'c2' has no volume 'x' \(volumes: csv1\)"):
        choose_volume("c2", "x", "csv1", {"csv1": "/a"})
    with pytest.raises(InvalidInputError, match="pick one with --volume"):
        choose_volume("c2", None, "csv1", {"a": "/a", "b": "/b"})
    with pytest.raises(NotFoundError, match="has no volume: add one"):
        choose_volume("c2", None, "csv1", {})


@pytest.mark.parametrize(("version", "level", "refused"), [(2, 3, False), (3, 3, False),
                                                           (3, 2, True)])  # fmt: skip
def test_version_rule(version: int, level: int, refused: bool) -> None:
    if refused:
        with pytest.raises(VersionError, match="upgrade-level c2"):
            check_level("web", version, "c2", level)
    else:
        check_level("web", version, "c2", level)


def test_replica_cluster_at_the_primary_level_or_newer() -> None:
    check_replica_level("web", "c1", 2, "c2", 2)
    check_replica_level("web", "c1", 2, "c2", 3)
    with pytest.raises(VersionError, match="replica cluster 'c2' is at functional level 1"):
        check_replica_level("web", "c1", 2, "c2", 1)


def test_name_free() -> None:
    check_name_free("web", "c2", {"db": "u2"}, "u1")
    with pytest.raises(ConflictError, match="already has a VM named 'web'"):
        check_name_free("web", "c2", {"web": "u9"}, "u1")
    with pytest.raises(ConflictError):
        check_name_free("web", "c2", {"other": "u1"}, "u1")


def test_crossed_spec_lives_in_its_own_dir_on_the_volume() -> None:
    spec = VmSpec(name="web", uuid="0b4e2c1a-0000-4000-8000-000000000001", config_version=3,
                  memory=128 * 2**20,
                  disks=(DiskSpec(path="/c1/csv1/u/disk0.qcow2", size=2**25, direct=True),
                         DiskSpec(path="/c1/csv1/u/data.raw", size=2**20, format="raw")),
                  kernel="/c1/csv1/u/kernel")  # fmt: skip
    crossed = crossed_spec(spec, "/c2/csv1")
    own = f"/c2/csv1/{spec.uuid}"
    assert [d.path for d in crossed.disks] == [f"{own}/disk0.qcow2", f"{own}/disk1.qcow2"]
    assert [d.format for d in crossed.disks] == ["qcow2", "qcow2"]
    assert crossed.disks[0].direct and crossed.disks[0].size == 2**25
    assert crossed.kernel == f"{own}/kernel" and crossed.initrd is None
    assert crossed.uuid == spec.uuid and crossed.name == "web"


def test_unprotected_window() -> None:
    assert unprotected_s(released_revision=7, taken_revision=7, released_at=1.0,
                         taken_at=1.5) == 0.0  # fmt: skip
    assert unprotected_s(released_revision=7, taken_revision=9, released_at=1.0,
                         taken_at=1.25) == 0.25  # fmt: skip
    assert unprotected_s(released_revision=7, taken_revision=9, released_at=2.0,
                         taken_at=1.0) == 0.0  # fmt: skip
