"""accelerator = "auto": a real probe boot under KVM, its cached verdict, and "tcg" as asked."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ferry.host import facts
from ferry.host.config import HostConfig

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, guest_cache: Path, accelerator: str) -> HostConfig:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return HostConfig(
        name="probe",
        data_dir=data,
        tls_dir=tmp_path / "tls",
        accelerator=accelerator,
        guest_cache=guest_cache,
    )  # type: ignore[arg-type]


def test_tcg_is_taken_as_configured(tmp_path: Path, guest_cache: Path) -> None:
    assert asyncio.run(facts.resolve_accelerator(_config(tmp_path, guest_cache, "tcg"))) == "tcg"
    assert not (tmp_path / "data" / facts.PROBE_FILE).exists()  # no probe was run


def test_auto_probes_once_and_caches_the_verdict(
    tmp_path: Path, guest_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, guest_cache, "auto")
    verdict = asyncio.run(facts.resolve_accelerator(config))
    assert verdict in ("kvm", "tcg")
    cache = tmp_path / "data" / facts.PROBE_FILE
    if not facts.kvm_usable():
        assert verdict == "tcg" and not cache.exists()  # nothing to probe without /dev/kvm
        return
    # Here (nested KVM) QEMU aborts on an MSR, so the probe says tcg; on a
    # real KVM host it boots and says kvm. Either way the verdict is cached...
    assert json.loads(cache.read_text())["accelerator"] == verdict

    async def no_second_probe(config: HostConfig) -> bool:
        raise AssertionError("the cached verdict should have been used")

    monkeypatch.setattr(facts, "probe_kvm_boots", no_second_probe)
    assert asyncio.run(facts.resolve_accelerator(config)) == verdict  # ...and reused
