"""The plan policy file: what each VM needs from its move, by name pattern or tag.

Pure: :func:`parse_policy` takes the file's text. TOML (or JSON, by the
file's name)::

    window = "22:00-02:00"          # optional: the maintenance window (UTC, daily)

    [[vm]]
    match = "db-*"                  # a shell pattern on the VM's name, or
    tag = "priority:high"           # a tag (below); one of match/tag
    must-run = true                 # only options that keep it running
    max-downtime = "500ms"          # 500ms, 2s, 1.5s
    window = "01:00-03:00"          # this VM's own window

A VM's tags: ``host:H``, ``cluster:C`` and ``priority:P`` for clustered VMs,
``role:primary``/``role:replica`` when replicated, ``state:running``/``off``.
Every ``[[vm]]`` entry that matches applies; for each need the last one
that sets it wins. Unknown keys, a bad pattern or a bad duration are refused
with one line naming the key and the entry.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from ferry.core.plan.plan_file import VmFacts
from ferry.errors import InvalidInputError

TOP_KEYS = ("window", "vm")
VM_KEYS = ("match", "tag", "must-run", "max-downtime", "window")
_WINDOW_RE = re.compile(r"^\s*([01]\d|2[0-3]):([0-5]\d)\s*-\s*([01]\d|2[0-3]):([0-5]\d)\s*$")
_DOWNTIME_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")


@dataclass(frozen=True)
class Window:
    """A daily maintenance window in UTC, minutes after midnight; it may pass midnight."""

    start: int
    end: int
    text: str

    @property
    def length_s(self) -> int:
        return ((self.end - self.start) % (24 * 60) or 24 * 60) * 60


@dataclass(frozen=True)
class VmRule:
    match: str | None
    tag: str | None
    must_run: bool | None
    max_downtime_s: float | None
    window: Window | None


@dataclass(frozen=True)
class Needs:
    """What the policy asks for one VM."""

    must_run: bool = False
    max_downtime_s: float | None = None
    window: Window | None = None


@dataclass(frozen=True)
class Policy:
    window: Window | None = None
    rules: tuple[VmRule, ...] = ()
    source: dict[str, Any] | None = None  # as read, for the plan file

    def needs(self, vm: VmFacts) -> Needs:
        must_run, downtime, window = False, None, self.window
        tags = tags_of(vm)
        for rule in self.rules:
            if rule.match is not None and not fnmatch.fnmatchcase(vm.name, rule.match):
                continue
            if rule.tag is not None and rule.tag not in tags:
                continue
            must_run = rule.must_run if rule.must_run is not None else must_run
            downtime = rule.max_downtime_s if rule.max_downtime_s is not None else downtime
            window = rule.window or window
        return Needs(must_run, downtime, window)


NO_POLICY = Policy()


def tags_of(vm: VmFacts) -> frozenset[str]:
    tags = {f"host:{vm.host}", f"state:{vm.state}"}
    if vm.cluster:
        tags.add(f"cluster:{vm.cluster}")
    if vm.priority:
        tags.add(f"priority:{vm.priority}")
    if vm.replication is not None:
        tags.add(f"role:{vm.replication.role}")
    return frozenset(tags)


def parse_window(text: object, *, where: str) -> Window:
    found = _WINDOW_RE.match(text) if isinstance(text, str) else None
    if found is None:
        raise InvalidInputError(f"{where}: window {text!r} is not HH:MM-HH:MM (UTC), "
                                "e.g. \"22:00-02:00\"")  # fmt: skip
    h1, m1, h2, m2 = (int(g) for g in found.groups())
    return Window(h1 * 60 + m1, h2 * 60 + m2, f"{h1:02}:{m1:02}-{h2:02}:{m2:02}")


def parse_downtime(text: object, *, where: str) -> float:
    """``500ms``, ``2s``, ``1.5s`` or a number of seconds."""
    if isinstance(text, bool):
        found = None
    elif isinstance(text, int | float):
        found = _DOWNTIME_RE.match(str(text))
    else:
        found = _DOWNTIME_RE.match(text) if isinstance(text, str) else None
    if found is None:
        raise InvalidInputError(f"{where}: max-downtime {text!r} is not a duration such as "
                                "500ms or 2s")  # fmt: skip
    value = float(found.group(1)) / (1000 if found.group(2) == "ms" else 1)
    if value <= 0:
        raise InvalidInputError(f"{where}: max-downtime {text!r} must be more than 0 (e.g. 500ms)")
    return value


def _unknown(keys: object, known: tuple[str, ...], where: str) -> None:
    if not isinstance(keys, dict):
        raise InvalidInputError(f"{where} must be a table of keys ({', '.join(known)})")
    extra = [k for k in keys if k not in known]
    if extra:
        raise InvalidInputError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(known)})")


def _rule(entry: object, where: str) -> VmRule:
    _unknown(entry, VM_KEYS, where)
    assert isinstance(entry, dict)
    match, tag = entry.get("match"), entry.get("tag")
    if (match is None) == (tag is None):
        raise InvalidInputError(f"{where}: give exactly one of match (a name pattern) or tag")
    for key, value in (("match", match), ("tag", tag)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise InvalidInputError(f"{where}: {key} must be a non-empty string")
    must_run = entry.get("must-run")
    if must_run is not None and not isinstance(must_run, bool):
        raise InvalidInputError(f"{where}: must-run must be true or false, not {must_run!r}")
    downtime = entry.get("max-downtime")
    window = entry.get("window")
    return VmRule(match, tag, must_run,
                  None if downtime is None else parse_downtime(downtime, where=where),
                  None if window is None else parse_window(window, where=where))  # fmt: skip


def parse_policy(text: str, *, name: str = "policy.toml") -> Policy:
    """The policy in ``text`` (JSON when ``name`` ends in .json, else TOML)."""
    try:
        doc: object = json.loads(text) if name.endswith(".json") else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if name.endswith(".json") else "TOML"
        raise InvalidInputError(f"policy {name} is not valid {kind}: {exc}") from None
    _unknown(doc, TOP_KEYS, f"policy {name}")
    assert isinstance(doc, dict)
    entries = doc.get("vm", [])
    if not isinstance(entries, list):
        raise InvalidInputError(f"policy {name}: vm must be a list of [[vm]] entries")
    window = doc.get("window")
    return Policy(
        window=None if window is None else parse_window(window, where=f"policy {name}"),
        rules=tuple(_rule(e, f"policy {name}, [[vm]] entry {i}") for i, e in
                    enumerate(entries, 1)),
        source=doc,
    )  # fmt: skip
