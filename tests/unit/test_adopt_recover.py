"""An adoption cut short by an agent restart is failed and leaves no VM dir behind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from ferry.adapters.catalog import Catalog
from ferry.host.adopt import ADOPT, AdoptionService
from ferry.host.jobs import JobRegistry
from ferry.host.vms.service import VmService


@dataclass
class _Vms:
    """What recovery reads of the VM service: the catalog and where VM dirs are."""

    catalog: Catalog
    root: Path
    config: object = None

    def vm_dir(self, uuid: str) -> Path:
        return self.root / uuid


def test_a_running_adoption_is_failed_and_its_dir_removed(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    jobs = JobRegistry(catalog)
    vms = _Vms(catalog=catalog, root=tmp_path / "vms")
    uuid = "5b0c2b1e-0d52-4d6c-9a57-6c1d3b0f0a11"
    half_done = vms.vm_dir(uuid) / "staging"
    half_done.mkdir(parents=True)
    (half_done / "source0.vmdk").write_bytes(b"KDMV")
    job = jobs.create(ADOPT, uuid, "web01", "running", source="/srv/images/web01.xml")
    finished = jobs.create(ADOPT, "", "other", "done")

    AdoptionService(cast(VmService, vms), jobs).recover()

    assert not vms.vm_dir(uuid).exists()
    again = JobRegistry(catalog).get(job.id)
    assert again.state == "failed" and "restarted" in again.detail["error"]
    assert JobRegistry(catalog).get(finished.id).state == "done"
