"""``ferry vm import --libvirt DOMAIN.xml | --ovf FILE`` : adopt a VM made elsewhere.

The agent of ``--host`` reads the file (it lies on that host, in its image
dirs), checks everything, converts the disks and registers the VM; what of the
source VM is not carried over comes back as notes, printed one per line on
stderr (and in ``--json`` as ``notes``).
"""

from __future__ import annotations

from ferry.cli.output import err, print_json, say
from ferry.core.network import parse_network_map
from ferry.errors import InvalidInputError


def adopt(host: str, *, folder: str | None, libvirt: str | None, ovf: str | None,
          name: str | None, mode: str, cluster: str | None, network_map: list[str],
          as_json: bool) -> None:  # fmt: skip
    from ferry.cli.vm_cmd import _run_job

    if libvirt is not None and ovf is not None:
        raise InvalidInputError("give --libvirt or --ovf, not both")
    if folder is not None:
        raise InvalidInputError(f"--libvirt and --ovf name the file to adopt; drop {folder!r}")
    if mode != "copy":
        raise InvalidInputError("--mode applies to export folders; an adoption always copies "
                                "the disks into new qcow2 files")  # fmt: skip
    if cluster is not None:
        raise InvalidInputError("--cluster and --volume apply to export folders; adopt the VM "
                                "on a host, then 'ferry cluster vm add'")  # fmt: skip
    origin, path = ("libvirt", libvirt) if libvirt is not None else ("ovf", ovf)
    assert path is not None
    body = {"origin": origin, "path": path, "name": name,
            "network_map": parse_network_map(network_map)}  # fmt: skip
    result = _run_job(host, "/v1/adoptions", body, as_json, what=f"adoption of {path}")
    if as_json:
        print_json({"result": "ok", **result})
        return
    kind = "libvirt domain" if origin == "libvirt" else "appliance"
    say(f"adopted VM {result['vm']} on {host} from {kind} {path} (uuid {result['uuid']}, "
        f"{result['disks']} disks, {len(result['nics'])} NICs)")  # fmt: skip
    for note in result.get("notes", []):
        err.print(f"ferry: note: {note}", markup=False)
