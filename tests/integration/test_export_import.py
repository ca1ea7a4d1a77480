"""Export/import, foreign disks, and keeping VMs through upgrades: for real."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from ferry.adapters import pki
from ferry.core.versions import DATA_SCHEMA_VERSION
from ferry.guest.records import read_records
from tests.conftest import UP, LabEnv, qemu_pids_for

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent.parent / "fixtures"


def up_seq(env: LabEnv, name: str) -> int:
    text = env.wait_console(name, lambda t: bool(UP.search(t)))
    return int(UP.findall(text)[0])


def vm_dirs(env: LabEnv, index: int) -> set[str]:
    path = env.lab.host(index).data_dir / "vms"
    return {p.name for p in path.iterdir()} if path.exists() else set()


@pytest.fixture(scope="module")
def exported(lab_env: LabEnv) -> tuple[Path, int]:
    """A stopped test-guest VM exported to a folder; returns (folder, last seq)."""
    cli = lab_env.cli
    cli("vm", "create", "origin", "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "32M", "--start")  # fmt: skip
    lab_env.wait_console("origin", lambda t: "seq 5\n" in t)
    cli("vm", "stop", "origin", "--timeout", "20s")
    disk = Path(lab_env.vm("origin")["disks"][0]["path"])
    last = read_records(disk).last_seq
    folder = lab_env.lab.images_dir / "origin-export"
    result = json.loads(cli("vm", "export", "origin", "--to", str(folder), "--json")
                        .stdout.splitlines()[-1])  # fmt: skip
    assert result["result"] == "ok" and result["folder"] == str(folder)
    return folder, last


def test_export_folder_is_self_contained(lab_env: LabEnv, exported: tuple[Path, int]) -> None:
    folder, last = exported
    assert sorted(p.name for p in folder.iterdir()) == [
        "disk0.qcow2", "initrd", "kernel", "manifest.json", "vm.json"]  # fmt: skip
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      str(folder / "disk0.qcow2")], capture_output=True,
                                     check=True).stdout)  # fmt: skip
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert info["virtual-size"] == 32 * 1024**2
    assert (folder / "disk0.qcow2").stat().st_blocks * 512 < 32 * 1024**2  # sparse
    vm = json.loads((folder / "vm.json").read_text())
    assert vm["uuid"] == lab_env.vm("origin")["uuid"] and vm["config_version"] == 3
    assert read_records(folder / "disk0.qcow2").last_seq == last
    assert not list(folder.parent.glob(".*partial*"))
    line = lab_env.cli.fails("vm", "export", "origin", "--to", str(folder))
    assert "already exists" in line


def test_import_in_each_mode_keeps_every_record(
    lab_env: LabEnv, exported: tuple[Path, int]
) -> None:
    folder, last = exported
    cli = lab_env.cli
    cli("vm", "import", str(folder), "--host", "host-2", "--mode", "copy", "--name", "copied")
    copied = lab_env.vm("copied")
    assert copied["uuid"] == lab_env.vm("origin")["uuid"]
    assert Path(copied["disks"][0]["path"]).is_relative_to(lab_env.lab.host(2).data_dir)
    cli("vm", "start", "copied")
    assert up_seq(lab_env, "copied") == last

    cli("vm", "import", str(folder), "--host", "host-2", "--mode", "new-id", "--name", "twin")
    twin = lab_env.vm("twin")
    assert twin["uuid"] != copied["uuid"]
    cli("vm", "start", "twin")
    assert up_seq(lab_env, "twin") == last

    # The same UUID twice on one host is refused; names clash too.
    line = cli.fails("vm", "import", str(folder), "--host", "host-2", "--mode", "register",
                     "--name", "third")  # fmt: skip
    assert "already exists on host 'host-2'; import with --mode new-id" in line
    line = cli.fails("vm", "import", str(folder), "--host", "host-2", "--mode", "new-id",
                     "--name", "twin")  # fmt: skip
    assert "a VM named 'twin' already exists" in line
    cli("vm", "delete", "copied", "--force")
    cli("vm", "delete", "twin", "--force")

    registered_folder = lab_env.lab.images_dir / "origin-register"
    shutil.copytree(folder, registered_folder)
    cli("vm", "import", str(registered_folder), "--host", "host-2", "--mode", "register",
        "--name", "inplace")  # fmt: skip
    inplace = lab_env.vm("inplace")
    assert inplace["disks"][0]["path"] == str(registered_folder / "disk0.qcow2")
    cli("vm", "start", "inplace")
    assert up_seq(lab_env, "inplace") == last
    cli("vm", "delete", "inplace", "--force")


def test_live_export_is_a_consistent_point_in_time(lab_env: LabEnv) -> None:
    cli = lab_env.cli
    cli("vm", "create", "busy", "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "64M", "--start")  # fmt: skip
    lab_env.wait_console("busy", lambda t: "seq 3\n" in t)
    line = cli.fails("vm", "export", "busy", "--to", str(lab_env.lab.images_dir / "x"))
    assert "stop it first" in line
    folder = lab_env.lab.images_dir / "busy-live"
    cli("vm", "export", "busy", "--to", str(folder), "--live")
    assert lab_env.vm("busy")["state"] == "running"  # it never stopped
    scan = read_records(folder / "disk0.qcow2")
    assert scan.corrupt == 0
    assert scan.last_seq >= 3 and scan.count == scan.last_seq  # a valid prefix: 1..N, no gaps
    cli("vm", "delete", "busy", "--force")


def _tampered(lab_env: LabEnv, folder: Path, name: str) -> Path:
    copy = lab_env.lab.images_dir / name
    shutil.copytree(folder, copy, symlinks=True)
    return copy


def _rewrite_manifest(folder: Path, change: Any) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _resum(folder: Path, name: str) -> None:
    """Make the manifest agree with a file we altered, as an attacker would."""
    import hashlib

    data = (folder / name).read_bytes()

    def change(manifest: dict[str, Any]) -> None:
        for entry in manifest["files"]:
            if entry["path"] == name:
                entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()

    _rewrite_manifest(folder, change)


def test_tampered_exports_are_refused(lab_env: LabEnv, exported: tuple[Path, int]) -> None:
    folder, _ = exported
    before = {vm["uuid"] for vm in lab_env.cli.json("vm", "list")}
    dirs = vm_dirs(lab_env, 2)
    cases: list[tuple[str, str]] = []

    bad = _tampered(lab_env, folder, "t-checksum")
    with (bad / "disk0.qcow2").open("r+b") as disk:
        disk.seek((bad / "disk0.qcow2").stat().st_size - 4096 + 17)  # inside, size unchanged
        disk.write(b"X")
    cases.append((str(bad), "does not match its SHA-256 checksum"))

    bad = _tampered(lab_env, folder, "t-traversal")
    _rewrite_manifest(
        bad,
        lambda m: m["files"].append(
            {"path": "../../hosts/host-1/host.toml", "size": 1, "sha256": "0" * 64}
        ),
    )
    cases.append((str(bad), "is not a plain file name"))

    bad = _tampered(lab_env, folder, "t-symlink")
    (bad / "kernel").unlink()
    (bad / "kernel").symlink_to("/etc/hostname")
    cases.append((str(bad), "kernel is a symlink"))

    bad = _tampered(lab_env, folder, "t-backing")
    (bad / "disk0.qcow2").unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F",
                    "raw", str(bad / "disk0.qcow2"), "32M"], check=True)  # fmt: skip
    _resum(bad, "disk0.qcow2")
    cases.append((str(bad), "has a backing file"))

    bad = _tampered(lab_env, folder, "t-size")
    _rewrite_manifest(bad, lambda m: m["files"][0].update(size=m["files"][0]["size"] + 1))
    cases.append((str(bad), "the manifest says"))

    bad = _tampered(lab_env, folder, "t-config")
    (bad / "vm.json").write_text('{"name": "x", "uuid": 5}')
    _resum(bad, "vm.json")
    cases.append((str(bad), "malformed vm.json"))

    bad = _tampered(lab_env, folder, "t-virtual-size")
    vm = json.loads((bad / "vm.json").read_text())
    vm["disks"][0]["size"] = 1024**3
    (bad / "vm.json").write_text(json.dumps(vm))
    _resum(bad, "vm.json")
    cases.append((str(bad), "has virtual size"))

    cases.append(("/etc", "outside the image dirs"))
    cases.append((str(lab_env.lab.images_dir / ".." / "hosts"), "without '..'"))

    for path, message in cases:
        line = lab_env.cli.fails("vm", "import", path, "--host", "host-2", "--name", "intruder")
        assert message in line, (path, line)
        assert {vm["uuid"] for vm in lab_env.cli.json("vm", "list")} == before
        assert vm_dirs(lab_env, 2) == dirs  # nothing written


@pytest.mark.parametrize("fmt", ["raw", "vhdx", "vmdk", "vdi"])
def test_foreign_disks_boot(lab_env: LabEnv, exported: tuple[Path, int], fmt: str) -> None:
    folder, last = exported
    image = lab_env.lab.images_dir / f"foreign.{fmt}"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", fmt, str(folder / "disk0.qcow2"),
                    str(image)], check=True)  # fmt: skip
    name = f"from-{fmt}"
    lab_env.cli("vm", "import-disk", name, str(image), "--host", "host-1", "--guest", "test",
                "--memory", "128M", "--start")  # fmt: skip
    vm = lab_env.vm(name)
    assert vm["disks"][0]["format"] == "qcow2" and vm["disks"][0]["size"] >= 32 * 1024**2
    assert up_seq(lab_env, name) == last
    lab_env.cli("vm", "delete", name, "--force")
    image.unlink()


def test_refresh_vms_moves_the_guest_to_a_fresh_qemu(lab_env: LabEnv) -> None:
    cli = lab_env.cli
    cli("vm", "create", "longrun", "--host", "host-1", "--guest", "test", "--memory", "128M",
        "--disk", "16M", "--start")  # fmt: skip
    lab_env.wait_console("longrun", lambda t: "seq 3\n" in t)
    before = lab_env.vm("longrun")
    report = cli.json("host", "refresh-vms", "host-1")
    (result,) = [r for r in report["results"] if r["vm"] == "longrun"]
    assert result["old_pid"] == before["pid"] and result["pid"] != before["pid"]
    after = lab_env.vm("longrun")
    assert after["state"] == "running" and after["pid"] == result["pid"]
    assert qemu_pids_for(before["uuid"]) == [result["pid"]]
    count = lab_env.console("longrun").count("seq ")
    text = lab_env.wait_console("longrun", lambda t: t.count("seq ") > count + 2)
    assert text.count("ferry-guest up") == 1  # the same boot, still counting

    lab_env.kill_agent(1)  # and a restarted agent finds the new process
    cli("lab", "up", "--hosts", "2", "--no-guest")
    assert lab_env.vm("longrun")["pid"] == result["pid"]
    check = cli.json("host", "upgrade-check", "host-1")
    assert "longrun" in check["running_vms"] and check["ok"]
    assert check["schema_version"] == DATA_SCHEMA_VERSION
    cli("vm", "delete", "longrun", "--force")


def test_a_data_dir_from_schema_1_is_migrated(lab_env: LabEnv, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with sqlite3.connect(data / "catalog.sqlite") as db:
        db.executescript((FIXTURES / "catalog-v1.sql").read_text())
    pki.issue_host_cert(lab_env.lab.ca_dir, tmp_path / "tls", "host-old", ips=["127.0.0.1"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "host.toml"
    config.write_text(tomli_w.dumps({"name": "host-old", "listen": f"127.0.0.1:{port}",
                                     "data_dir": str(data), "tls_dir": str(tmp_path / "tls"),
                                     "accelerator": "tcg"}))  # fmt: skip
    agent = subprocess.Popen([sys.executable, "-m", "ferry", "agent", "--config", str(config)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        lab_env.cli("host", "add", "host-old", f"https://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        while lab_env.cli("host", "show", "host-old", check=False).returncode != 0:
            assert time.monotonic() < deadline and agent.poll() is None
            time.sleep(0.3)
        (vm,) = lab_env.cli.json("vm", "list", "--host", "host-old")
        assert vm["name"] == "veteran" and vm["config_version"] == 2 and vm["state"] == "off"
        assert lab_env.cli.json("host", "show", "host-old")["schema_version"] == DATA_SCHEMA_VERSION
        assert lab_env.cli.json("job", "list", "--host", "host-old") == []  # new tables exist
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        lab_env.cli("host", "remove", "host-old", check=False)


def test_an_interrupted_export_leaves_no_folder_that_looks_complete(lab_env: LabEnv) -> None:
    image = lab_env.lab.images_dir / "heavy.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "3G"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x33 0 1536M", str(image)], check=True,
                   capture_output=True)  # fmt: skip
    lab_env.cli("vm", "create", "heavy", "--host", "host-1", "--image", str(image))
    image.unlink()
    folder = lab_env.lab.images_dir / "heavy-export"
    env = dict(os.environ, FERRY_HOME=str(lab_env.home))
    export = subprocess.Popen([sys.executable, "-m", "ferry", "vm", "export", "heavy", "--to",
                               str(folder)], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            jobs = [j for j in lab_env.cli.json("job", "list", "--host", "host-1")
                    if j["kind"] == "export" and j["vm"] == "heavy"]  # fmt: skip
            if jobs and jobs[-1]["progress"].get("bytes"):
                break
            assert time.monotonic() < deadline, "the export never made progress"
            time.sleep(0.1)
        lab_env.kill_agent(1)
        assert export.wait(timeout=60) != 0
        assert not folder.exists()
        lab_env.cli("lab", "up", "--hosts", "2", "--no-guest")
        job = [j for j in lab_env.cli.json("job", "list", "--host", "host-1")
               if j["kind"] == "export" and j["vm"] == "heavy"][-1]  # fmt: skip
        assert job["state"] == "failed" and "restarted" in job["error"]
        assert not folder.exists()
        assert not list(lab_env.lab.images_dir.glob(".heavy-export.partial*"))
    finally:
        if export.poll() is None:
            export.kill()
            export.wait()
        lab_env.cli("vm", "delete", "heavy", "--force", check=False)
