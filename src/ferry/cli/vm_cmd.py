"""``ferry vm ...``: the VM life cycle on any known host.

Over 400 lines because it is one command group, ``ferry vm``, with fifteen
commands that share the VM lookup, the job follower and the output helpers.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from ferry.cli.option_order import TypedOrderCommand, in_typed_order, typed_order
from ferry.cli.output import err, print_json, print_table, say
from ferry.cli.vnc_cmd import vnc
from ferry.core.cpu_models import check_model_name
from ferry.core.firmware import check_firmware
from ferry.core.network import parse_network_map, parse_nic_option
from ferry.core.units import format_size, parse_duration, parse_size
from ferry.errors import FerryError, InvalidInputError, NotFoundError

if TYPE_CHECKING:  # the client stack (aiohttp, TLS) loads only for commands that talk
    from ferry.client.fleet import Fleet

app = typer.Typer(help="Create, run and remove VMs.", no_args_is_help=True)
app.command("vnc")(vnc)

T = TypeVar("T")

HostOpt = typer.Option(None, "--host", "-H", help="The host, where the name is ambiguous.")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")
NetworkMapOpt = typer.Option(
    [], "--network-map", metavar="SRC=DST",
    help="Put the VM's NICs on network SRC onto the destination's network DST (repeat); "
    "MACs stay. Networks not named keep their names.",
)  # fmt: skip


def with_fleet(body: Callable[[Fleet], Awaitable[T]]) -> T:
    from ferry.client.fleet import Fleet
    from ferry.client.settings import load_settings

    async def run() -> T:
        async with Fleet(load_settings()) as fleet:
            return await body(fleet)

    return asyncio.run(run())


def _vm_row(vm: dict[str, Any]) -> list[Any]:
    return [vm["name"], vm["host"], vm["state"], vm["config_version"],
            format_size(vm["memory"]), vm["cpus"], vm["uuid"]]  # fmt: skip


_VM_COLUMNS = ["NAME", "HOST", "STATE", "VERSION", "MEMORY", "CPUS", "UUID"]


def _show(vm: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(vm)
        return
    print_table(_VM_COLUMNS, [_vm_row(vm)])
    if vm.get("cluster"):
        say(f"  cluster {vm['cluster']}")
    if vm.get("vnc"):
        say(f"  display vnc ('ferry vm vnc {vm['name']}' connects)")
    if vm.get("guest_agent"):
        say("  guest agent channel (org.qemu.guest_agent.0)")
    if vm.get("cpu_model"):
        say(f"  cpu model {vm['cpu_model']}")
    if vm.get("firmware") == "uefi":
        say(f"  firmware uefi, boots disk {vm.get('boot_disk', 0)}")
    for disk in vm.get("disks", []):
        what = "UEFI variable store" if disk.get("firmware") else "disk"
        say(f"  {what} {disk['path']} ({format_size(disk['size'])}, {disk['format']})")
    for nic in vm.get("nics", []):
        address = f", ip {nic['ip']}" if nic.get("ip") else ""
        say(f"  nic {nic['network']} mac {nic['mac']} ({nic['model']}{address})")


def _disks_as_typed(ctx: typer.Context, images: list[str], sizes: list[str]) -> list[Any]:
    """The disk requests of ``--image`` and ``--disk``, in the order they were typed."""
    typed = in_typed_order(typed_order(ctx), {"image": images, "disk": sizes})
    return [{"image": value} if option == "image" else
            {"size": parse_size(value, what="disk size")} for option, value in typed]  # fmt: skip


@app.command("create", cls=TypedOrderCommand)
def create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="VM name, unique on its host (or in its cluster)."),
    host: str | None = typer.Option(
        None, "--host", "-H", help="Host to create it on (with --cluster: the node it runs on)."
    ),
    memory: str = typer.Option("256M", "--memory", "-m", help="Memory, e.g. 256M, 1G."),
    cpus: int = typer.Option(1, "--cpus", help="Virtual CPUs."),
    disk: list[str] = typer.Option(
        [], "--disk", help="New empty qcow2 disk of SIZE (repeat); disks keep the order typed."
    ),
    image: list[str] = typer.Option(
        [], "--image", help="Disk copied from an image file on the host (repeat), in order typed."
    ),
    guest: str | None = typer.Option(None, "--guest", help="'test' boots ferry's test guest."),
    kernel: str | None = typer.Option(None, "--kernel", help="Kernel file on the host."),
    initrd: str | None = typer.Option(None, "--initrd", help="Initrd file on the host."),
    append: str | None = typer.Option(None, "--append", help="Kernel command line."),
    config_version: int | None = typer.Option(
        None, "--config-version", help="Configuration version (default: the host's level)."
    ),
    volume: str | None = typer.Option(
        None, "--volume", help="Put the disks on this shared volume of the host (or cluster)."
    ),
    cluster: str | None = typer.Option(
        None, "--cluster", help="Make it a clustered VM of this cluster (needs --volume)."
    ),
    priority: str = typer.Option(
        "medium", "--priority", help="With --cluster: high, medium or low (HA restarts high first)."
    ),
    start: bool = typer.Option(False, "--start", help="Start the VM once created."),
    display: str = typer.Option(
        "none", "--display", help="none, or vnc: a graphical console ('ferry vm vnc NAME')."
    ),
    guest_agent: bool = typer.Option(
        False,
        "--guest-agent",
        help="Give the VM a QEMU guest agent channel (qemu-guest-agent in the guest): "
        "app-consistent replication points, clean shutdown when ACPI is ignored.",
    ),
    cpu_model: str | None = typer.Option(
        None,
        "--cpu-model",
        help="QEMU CPU model, e.g. Westmere-v1 (default: Westmere-v1 on KVM hosts, max under "
        "TCG; 'ferry host show H --json' lists cpu_models).",
    ),
    nic: list[str] = typer.Option(
        [],
        "--nic",
        metavar="NETWORK[,mac=MAC][,model=virtio]",
        help="A network card on host network NETWORK (repeat for more); the MAC is chosen "
        "once if not given and kept for the VM's life; model virtio unless named.",
    ),
    firmware: str = typer.Option(
        "bios", "--firmware", help="bios (SeaBIOS), or uefi (OVMF, its own variable store)."
    ),
    boot_disk: int = typer.Option(
        0, "--boot-disk", help="The disk to boot without --kernel: 0 is the first --image/--disk."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Create a VM (off, unless --start)."""
    if guest not in (None, "test"):
        raise InvalidInputError(f"unknown guest {guest!r}: the only built-in guest is 'test'")
    if host is None and cluster is None:
        raise InvalidInputError("say where: --host H, or --cluster C (placement picks a node)")
    if priority not in ("high", "medium", "low"):
        raise InvalidInputError(f"--priority must be high, medium or low, not {priority!r}")
    if display not in ("none", "vnc"):
        raise InvalidInputError(f"--display must be none or vnc, not {display!r}")
    body: dict[str, Any] = {
        "name": name,
        "memory": parse_size(memory, what="memory"),
        "cpus": cpus,
        # The guest sees the disks in the order --image and --disk were typed.
        "disks": _disks_as_typed(ctx, image, disk),
        "firmware": check_firmware(firmware),
        "boot_disk": boot_disk,
        "guest": guest,
        "kernel": kernel,
        "initrd": initrd,
        "append": append,
        "config_version": config_version,
        "volume": volume,
        "display": display,
        "guest_agent": guest_agent,
        "cpu_model": None if cpu_model is None else check_model_name(cpu_model),
        "nics": [vars(parse_nic_option(item)) for item in nic],
    }
    if cluster is not None:
        body.update(cluster=cluster, priority=priority, node=host)

    async def run(fleet: Fleet) -> dict[str, Any]:
        where = host
        if cluster is not None:
            from ferry.cli.cluster_vm_cmd import cluster_node

            where = await cluster_node(fleet, cluster, host)
        assert where is not None
        with err.status(f"creating VM {name} on {where}"):
            vm: dict[str, Any] = await fleet.client(where).call("POST", "/v1/vms", body=body)
        if start:
            with err.status(f"starting VM {name}"):
                vm = await _start_created(fleet, vm)
        return vm

    vm = with_fleet(run)
    if as_json:
        print_json(vm)
    else:
        say(f"created VM {vm['name']} on {vm['host']} ({vm['state']}, uuid {vm['uuid']})")


async def _start_created(fleet: Fleet, vm: dict[str, Any]) -> dict[str, Any]:
    """Start a new VM on its host (a clustered one's owner registers it within moments)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            started: dict[str, Any] = await fleet.client(vm["host"]).post(
                f"/v1/vms/{vm['name']}/start")  # fmt: skip
            return started
        except NotFoundError:
            if vm.get("cluster") is None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


_GERUNDS = {"start": "starting", "stop": "stopping", "kill": "killing", "pause": "pausing",
            "resume": "resuming"}  # fmt: skip


def _action(name: str, host: str | None, verb: str, body: dict[str, Any] | None = None) -> Any:
    async def run(fleet: Fleet) -> Any:
        where, _ = await fleet.locate(name, host)
        with err.status(f"{_GERUNDS[verb]} VM {name} on {where}"):
            return await fleet.client(where).post(f"/v1/vms/{name}/{verb}", body)

    return with_fleet(run)


@app.command("start")
def start_vm(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Start a VM."""
    vm = _action(name, host, "start")
    if as_json:
        print_json(vm)
    elif vm.get("owner_acts"):  # --host named a node of its cluster that does not own it
        say(f"VM {name} is wanted running: its owner {vm['host']} starts it")
    else:
        say(f"VM {name} is {vm['state']} on {vm['host']}")


@app.command("stop")
def stop_vm(
    name: str,
    host: str | None = HostOpt,
    timeout: str = typer.Option("30s", "--timeout", help="Wait this long, then force off."),
    as_json: bool = JsonOpt,
) -> None:
    """Shut a VM down (ACPI power button), forcing it off after --timeout."""
    result = _action(name, host, "stop", {"timeout_s": parse_duration(timeout, what="timeout")})
    if as_json:
        print_json(result)
    elif result.get("owner_acts"):  # asked on a node of its cluster that does not own it
        say(f"VM {name} is wanted off: its owner {result['host']} stops it")
    else:
        how = "forced off after the timeout" if result["forced"] else "shut down cleanly"
        say(f"VM {name} {how}")


@app.command("kill")
def kill_vm(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Turn a VM off at once (like pulling the plug)."""
    vm = _action(name, host, "kill")
    print_json(vm) if as_json else say(f"VM {name} is {vm['state']}")


@app.command("pause")
def pause_vm(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Freeze a running VM (its memory stays; resume continues where it was)."""
    vm = _action(name, host, "pause")
    print_json(vm) if as_json else say(f"VM {name} is {vm['state']}")


@app.command("resume")
def resume_vm(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Let a paused VM run again."""
    vm = _action(name, host, "resume")
    print_json(vm) if as_json else say(f"VM {name} is {vm['state']}")


@app.command("delete")
def delete_vm(
    name: str,
    host: str | None = HostOpt,
    force: bool = typer.Option(False, "--force", help="Kill it first if it runs."),
) -> None:
    """Delete a VM and its disks."""

    async def run(fleet: Fleet) -> None:
        where, _ = await fleet.locate(name, host)
        await fleet.client(where).delete(f"/v1/vms/{name}", force="1" if force else "0")

    with_fleet(run)
    say(f"deleted VM {name} and its disks")


@app.command("list")
def list_vms(host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """List VMs on every known host (or one)."""

    async def run(fleet: Fleet) -> tuple[list[dict[str, Any]], list[str]]:
        vms: list[dict[str, Any]] = []
        failed: list[str] = []
        for name, result in (await fleet.each("/v1/vms", host)).items():
            if isinstance(result, FerryError):
                if host is not None:
                    raise result
                failed.append(f"{name}: {result}")
            else:
                vms += result
        return vms, failed

    vms, failed = with_fleet(run)
    for line in failed:
        err.print(f"ferry: warning: {line}", markup=False)
    if as_json:
        keys = ("name", "uuid", "host", "state", "config_version", "memory", "cpus", "cluster")
        print_json([{key: vm.get(key) for key in keys} for vm in vms])
    else:
        print_table(_VM_COLUMNS, [_vm_row(vm) for vm in vms])


@app.command("show")
def show_vm(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Show one VM."""
    _, vm = with_fleet(lambda fleet: fleet.locate(name, host))
    _show(vm, as_json)


@app.command("console")
def console(
    name: str,
    host: str | None = HostOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new output."),
    until: str | None = typer.Option(
        None, "--until", help="With --follow: stop once this text appears."
    ),
    timeout: str | None = typer.Option(None, "--timeout", help="With --follow: give up after."),
    as_json: bool = typer.Option(
        False, "--json", help='Print {"vm","host","text","offset"} (not with --follow).'
    ),
) -> None:
    """Print the serial console log of the VM's current run."""
    if as_json and follow:
        raise InvalidInputError("--json prints the log once; drop --follow")
    limit = parse_duration(timeout, what="timeout") if timeout else None

    async def run(fleet: Fleet) -> None:
        where, _ = await fleet.locate(name, host)
        client = fleet.client(where)
        offset, seen = 0, ""
        started = time.monotonic()
        while True:
            chunk = await client.get(f"/v1/vms/{name}/console", offset=str(offset))
            if as_json:
                print_json({"vm": name, "host": where, **chunk})
                return
            sys.stdout.write(chunk["text"])
            sys.stdout.flush()
            offset = chunk["offset"]
            seen = (seen + chunk["text"])[-4096:]
            if not follow or (until is not None and until in seen):
                return
            if limit is not None and time.monotonic() - started > limit:
                raise FerryError(f"{until!r} did not appear on the console of {name} in time")
            await asyncio.sleep(0.3)

    with_fleet(run)


@app.command("upgrade-version")
def upgrade_version(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Raise a VM's configuration version to its host's functional level (one way)."""

    async def run(fleet: Fleet) -> Any:
        where, _ = await fleet.locate(name, host)
        return await fleet.client(where).post(f"/v1/vms/{name}/upgrade-version")

    vm = with_fleet(run)
    if as_json:
        print_json(vm)
    else:
        say(f"VM {name} now has configuration version {vm['config_version']}")


@app.command("refresh")
def refresh(name: str, host: str | None = HostOpt, as_json: bool = JsonOpt) -> None:
    """Move a running VM into a fresh QEMU process on its host, live (after a QEMU upgrade)."""

    async def run(fleet: Fleet) -> Any:
        where, _ = await fleet.locate(name, host)
        with err.status(f"moving VM {name} into a fresh QEMU on {where}"):
            return {"host": where, **await fleet.client(where).post(f"/v1/vms/{name}/refresh")}

    report = with_fleet(run)
    if as_json:
        print_json(report)
    else:
        say(f"VM {name} runs in a fresh QEMU on {report['host']} (pid {report['old_pid']} -> "
            f"{report['pid']}, downtime {report.get('downtime_ms')} ms)")  # fmt: skip


@app.command("move")
def move(
    name: str,
    to: str | None = typer.Option(
        None, "--to", help="Destination host (with --to-cluster: a node of that cluster)."
    ),
    to_cluster: str | None = typer.Option(
        None,
        "--to-cluster",
        metavar="CLUSTER",
        help="Move a clustered VM into another cluster, live and protected by one cluster "
        "throughout (the disks are copied onto its volume unless it sees the same one).",
    ),
    volume: str | None = typer.Option(
        None,
        "--volume",
        help="With --to-cluster: the target cluster's volume for the disks (default: the "
        "VM's volume's name, else the cluster's only volume).",
    ),
    host: str | None = HostOpt,
    storage: str = typer.Option(
        "auto", "--storage", help="auto (shared if the destination sees the disks), shared, copy."
    ),
    max_bandwidth: str | None = typer.Option(
        None, "--max-bandwidth", help="Bytes per second, e.g. 256M (default: the host's cap)."
    ),
    downtime_limit: int | None = typer.Option(
        None, "--downtime-limit", help="Target downtime in ms at switch-over."
    ),
    network_map: list[str] = NetworkMapOpt,
    postcopy: bool = typer.Option(
        False,
        "--postcopy",
        help="After the first pass over memory, run the guest on the destination at once and "
        "fetch the rest of its memory from the source on demand: always converges, shortest "
        "pause. RISK: until the last page arrived the memory is split over both hosts; if the "
        "link or either host fails then, the VM is lost. Without it, auto-converge slows a "
        "guest that dirties memory faster than the link.",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Live-migrate a running VM to another host; the guest keeps running."""
    from ferry.cli.progress import follow_job

    networks = parse_network_map(network_map)
    if storage not in ("auto", "shared", "copy"):
        raise InvalidInputError(f"--storage must be auto, shared or copy, not {storage!r}")
    if downtime_limit is not None and downtime_limit <= 0:
        raise InvalidInputError("--downtime-limit must be a positive number of milliseconds")
    bandwidth = parse_size(max_bandwidth, what="bandwidth") if max_bandwidth else None
    if to is None and to_cluster is None:
        raise InvalidInputError("vm move needs --to HOST, or --to-cluster CLUSTER")
    if postcopy and to_cluster is not None:
        raise InvalidInputError("--postcopy is for moves between hosts, not --to-cluster")
    if volume is not None and to_cluster is None:
        raise InvalidInputError("--volume goes with --to-cluster (a move inside a cluster "
                                "stays on the VM's volume)")  # fmt: skip

    async def run(fleet: Fleet) -> dict[str, Any]:
        source, _ = await fleet.locate(name, host)
        body = {"to": to or "", "to_url": "", "storage": storage,
                "max_bandwidth": bandwidth, "downtime_limit_ms": downtime_limit,
                "network_map": networks}  # fmt: skip
        if postcopy:
            body["postcopy"] = True
        if to_cluster is not None:  # the VM's owner finds the node and its URL in the store
            body.update(to_cluster=to_cluster, volume=volume)
        elif to is not None:
            body["to_url"] = fleet.settings.host(to).url
        job = await fleet.client(source).post(f"/v1/vms/{name}/move", body)
        return await follow_job(fleet.client(source), job, as_json=as_json)

    job = with_fleet(run)
    where = to if to_cluster is None else f"cluster {to_cluster}"
    if job["state"] != "done":
        raise FerryError(f"move of VM {name} to {where} {job['state']}: {job.get('error')}")
    result = job["result"]
    if as_json:
        print_json(result)
    elif to_cluster is not None:
        say(f"VM {name} now runs on {result['host']} in cluster {result.get('cluster')} "
            f"({result['storage']} storage): {result['total_s']:.1f} s in all, "
            f"{result['downtime_ms']} ms downtime, unprotected "
            f"{result.get('unprotected_s')} s")  # fmt: skip
    else:
        say(f"VM {name} now runs on {result['host']} ({result['storage']} storage): "
            f"{result['total_s']:.1f} s in all, {result['downtime_ms']} ms downtime")  # fmt: skip


def _run_job(
    source: str, path: str, body: dict[str, Any], as_json: bool, *, what: str
) -> dict[str, Any]:
    from ferry.cli.progress import follow_job

    async def run(fleet: Fleet) -> dict[str, Any]:
        job = await fleet.client(source).post(path, body)
        return await follow_job(fleet.client(source), job, as_json=as_json)

    job = with_fleet(run)
    if job["state"] != "done":
        raise FerryError(f"{what} {job['state']}: {job.get('error')}")
    result: dict[str, Any] = job["result"]
    return result


@app.command("export")
def export_vm(
    name: str,
    to: str = typer.Option(..., "--to", help="New folder on the VM's host (in its image dirs)."),
    live: bool = typer.Option(False, "--live", help="Export a running VM at one point in time."),
    max_bandwidth: str | None = typer.Option(
        None,
        "--max-bandwidth",
        metavar="RATE",
        help="With --live: cap how fast the copy reads the VM's disks (bytes/s, e.g. 50M).",
    ),
    host: str | None = HostOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export a VM as a self-contained folder (config, consolidated disks, manifest)."""
    bandwidth = parse_size(max_bandwidth, what="bandwidth") if max_bandwidth else None
    where, _ = with_fleet(lambda fleet: fleet.locate(name, host))
    body: dict[str, Any] = {"to": to, "live": live}
    if bandwidth is not None:
        body["max_bandwidth"] = bandwidth
    result = _run_job(where, f"/v1/vms/{name}/export", body, as_json, what=f"export of VM {name}")
    if as_json:
        print_json({"result": "ok", **result})
    else:
        say(f"exported VM {name} to {result['folder']} on {where} "
            f"({format_size(result['bytes'])} in {result['files']} files)")  # fmt: skip


@app.command("import")
def import_vm(
    folder: str | None = typer.Argument(
        None, help="An export folder on the host (or adopt with --libvirt / --ovf)."
    ),
    host: str = typer.Option(..., "--host", "-H", help="The host that has the folder."),
    libvirt: str | None = typer.Option(
        None,
        "--libvirt",
        metavar="DOMAIN.xml",
        help="Adopt a libvirt domain (virsh dumpxml) from this file on the host, in its image "
        "dirs; its disks must lie in the image dirs too.",
    ),
    ovf: str | None = typer.Option(
        None,
        "--ovf",
        metavar="FILE.ovf|FILE.ova",
        help="Adopt an OVF appliance (VMware, VirtualBox) from this file on the host, in its "
        "image dirs; its disks must lie in its folder or archive.",
    ),
    mode: str = typer.Option(
        "copy", "--mode", help="register (use in place), copy, new-id (copy with a new UUID)."
    ),
    new_name: str | None = typer.Option(None, "--name", help="Import under another name."),
    cluster: str | None = typer.Option(
        None, "--cluster", help="Import as a clustered VM of this cluster (needs --volume)."
    ),
    volume: str | None = typer.Option(
        None, "--volume", help="With --cluster: the cluster volume its disks are copied onto."
    ),
    network_map: list[str] = NetworkMapOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Import a VM from an export folder, or adopt a libvirt domain or an OVF appliance
    (checked before anything is registered)."""
    if libvirt is not None or ovf is not None:
        from ferry.cli.adopt_cmd import adopt

        adopt(host, folder=folder, libvirt=libvirt, ovf=ovf, name=new_name, mode=mode,
              cluster=cluster or volume, network_map=network_map,
              as_json=as_json)  # fmt: skip
        return
    if folder is None:
        raise InvalidInputError("name an export folder, or adopt with --libvirt or --ovf")
    if mode not in ("register", "copy", "new-id"):
        raise InvalidInputError(f"--mode must be register, copy or new-id, not {mode!r}")
    body = {"folder": folder, "mode": mode, "name": new_name, "cluster": cluster,
            "volume": volume, "network_map": parse_network_map(network_map)}  # fmt: skip
    result = _run_job(host, "/v1/imports", body, as_json, what=f"import from {folder}")
    if as_json:
        print_json({"result": "ok", **result})
        return
    where = f" in cluster {cluster}" if cluster else ""
    say(f"imported VM {result['vm']} on {host}{where} ({mode}, uuid {result['uuid']})")
    for note in result.get("notes", []):
        err.print(f"ferry: note: {note}", markup=False)


@app.command("import-disk")
def import_disk(
    ctx: typer.Context,
    name: str,
    images: list[str] = typer.Argument(
        ..., help="Disk images on the host (qcow2, raw, VHDX, VMDK, VDI), in its image dirs."
    ),
    host: str = typer.Option(..., "--host", "-H", help="Host to create the VM on."),
    memory: str = typer.Option("256M", "--memory", "-m"),
    cpus: int = typer.Option(1, "--cpus"),
    guest: str | None = typer.Option(None, "--guest", help="'test': boot ferry's test kernel."),
    start: bool = typer.Option(False, "--start"),
    as_json: bool = JsonOpt,
) -> None:
    """Create a VM from existing disk images, converted to qcow2 (sparse kept)."""
    create(ctx, name=name, host=host, memory=memory, cpus=cpus, disk=[], image=images, guest=guest,
           kernel=None, initrd=None, append=None, config_version=None, volume=None,
           cluster=None, priority="medium", start=start, display="none",
           guest_agent=False, cpu_model=None, nic=[], firmware="bios", boot_disk=0,
           as_json=as_json)  # fmt: skip
