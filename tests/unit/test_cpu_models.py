"""CPU models: QEMU's definitions as host facts, the default model, and the refusal."""

from __future__ import annotations

import pytest

from ferry.core.cpu_models import (
    KVM_DEFAULT,
    CpuFacts,
    check_cpu,
    check_model_name,
    cpu_argument,
    cpu_refusal,
    default_model,
    effective_model,
    parse_definitions,
)
from ferry.errors import ConflictError, InvalidInputError

# Entries as QEMU 7.2 answers query-cpu-definitions under TCG here (trimmed).
TCG_REPLY: list[dict[str, object]] = [
    {"name": "max", "unavailable-features": [], "static": False, "migration-safe": False},
    {"name": "host", "unavailable-features": ["kvm"], "static": False},
    {"name": "Westmere-v1", "unavailable-features": [], "migration-safe": True},
    {"name": "Westmere", "unavailable-features": [], "alias-of": "Westmere-v1"},
    {"name": "Haswell-v4", "migration-safe": True,
     "unavailable-features": ["pcid", "x2apic", "tsc-deadline", "invpcid", "spec-ctrl"]},
    {"name": "Icelake-Server-v6", "unavailable-features": [f"f{i}" for i in range(34)]},
    {"name": "Westmere-v2", "unavailable-features": ["spec-ctrl"]},
]  # fmt: skip


def facts(allowed: tuple[str, ...] = ()) -> CpuFacts:
    return CpuFacts(host="host-2", models=parse_definitions(TCG_REPLY, allowed=allowed))


def test_definitions_become_models_sorted_with_their_missing_features() -> None:
    models = parse_definitions(TCG_REPLY)
    assert [m.name for m in models][:3] == ["Haswell-v4", "host", "Icelake-Server-v6"]
    haswell = facts().find("Haswell-v4")
    assert haswell is not None and not haswell.runnable and haswell.allowed
    assert haswell.unavailable_features == ("pcid", "x2apic", "tsc-deadline", "invpcid",
                                            "spec-ctrl")  # fmt: skip
    westmere = facts().find("Westmere-v1")
    assert westmere is not None and westmere.runnable and westmere.unavailable_features == ()


def test_a_host_toml_list_narrows_what_is_runnable() -> None:
    narrowed = facts(allowed=("max", "Haswell-v4"))
    westmere = narrowed.find("Westmere-v1")
    assert westmere is not None and not westmere.runnable and not westmere.allowed
    maximum = narrowed.find("max")
    assert maximum is not None and maximum.runnable


def test_a_model_the_host_runs_is_not_refused() -> None:
    assert cpu_refusal("Westmere-v1", facts()) is None
    assert cpu_refusal("Westmere", facts()) is None  # an alias QEMU lists is a model too
    assert cpu_refusal("max", facts()) is None


def test_none_is_the_legacy_max() -> None:
    assert effective_model(None) == "max"
    assert cpu_refusal(None, facts()) is None
    assert "'max'" in (cpu_refusal(None, facts(allowed=("Westmere-v1",))) or "")


def test_missing_features_are_named_in_one_line() -> None:
    line = cpu_refusal("Haswell-v4", facts())
    assert line == ("host 'host-2' cannot run CPU model 'Haswell-v4': it lacks features "
                    "pcid, x2apic, tsc-deadline, invpcid, spec-ctrl")  # fmt: skip
    assert cpu_refusal("Westmere-v2", facts()) == (
        "host 'host-2' cannot run CPU model 'Westmere-v2': it lacks feature spec-ctrl"
    )
    many = cpu_refusal("Icelake-Server-v6", facts()) or ""
    assert "f0, f1" in many and "f11 and 22 more" in many and "f12" not in many
    assert "\n" not in many


def test_host_needs_kvm() -> None:
    assert cpu_refusal("host", facts()) == (
        "host 'host-2' cannot run CPU model 'host': it lacks feature kvm"
    )


def test_an_unknown_model_and_a_model_host_toml_leaves_out() -> None:
    unknown = cpu_refusal("Pentium-9000", facts()) or ""
    assert unknown.startswith("host 'host-2' has no CPU model 'Pentium-9000'")
    assert "cpu_models" in unknown
    left_out = cpu_refusal("Westmere-v1", facts(allowed=("max", "qemu64-v1"))) or ""
    assert left_out == ("host 'host-2' does not offer CPU model 'Westmere-v1': its host.toml "
                        "cpu_models allows only max")  # fmt: skip


def test_a_host_that_reports_no_models_refuses_nothing() -> None:
    assert cpu_refusal("Haswell-v4", CpuFacts(host="old")) is None


def test_check_cpu_raises_the_refusal_for_the_vm() -> None:
    with pytest.raises(ConflictError, match=r"^VM 'web': host 'host-2' cannot run"):
        check_cpu("Haswell-v4", facts(), vm="web")
    check_cpu("Westmere-v1", facts(), vm="web")


def test_defaults_by_accelerator() -> None:
    assert default_model("kvm") == KVM_DEFAULT == "Westmere-v1"
    assert default_model("tcg") == "max"


def test_named_models_run_with_enforce() -> None:
    assert cpu_argument(None) == "max"
    assert cpu_argument("max") == "max"
    assert cpu_argument("host") == "host"
    assert cpu_argument("Westmere-v1") == "Westmere-v1,enforce"


@pytest.mark.parametrize("bad", ["", "max,+avx", "a b", "-cpu", "x" * 65, "Westmere;rm"])
def test_a_model_name_is_never_options(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid CPU model"):
        check_model_name(bad)
    assert check_model_name("Skylake-Server-noTSX-IBRS") == "Skylake-Server-noTSX-IBRS"


def test_a_stored_spec_never_holds_options_as_its_model() -> None:
    from pydantic import ValidationError

    from ferry.core.spec import VmSpec

    VmSpec(name="ok", config_version=3, memory=1 << 27, cpu_model="Westmere-v1")
    with pytest.raises(ValidationError):
        VmSpec(name="peer", config_version=3, memory=1 << 27, cpu_model="max,+avx512f")
