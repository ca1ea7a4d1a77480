"""Plan apply's pure part: step life cycle, state file, resume decisions, prechecks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ferry.core.plan.apply_state import (
    Action,
    ApplyState,
    Decision,
    HostSeen,
    JobSeen,
    StepOp,
    StepPlan,
    StepRecord,
    StepState,
    VmSeen,
    advance,
    capacity_shortfall,
    decide,
    in_place_work,
    precheck,
    step_key,
    step_plan,
    upgrade_allowed,
)
from ferry.core.plan.plan_file import Option, Preconditions, Step
from ferry.errors import InvalidInputError, StateError, StorageError

M = 1024**2
MOVE = StepPlan(key="1:a", vm="a", uuid="u-a", action=Action.LIVE_MOVE, source="host-1",
                target="host-2", storage="copy", must_run=True)  # fmt: skip
EXPORT = StepPlan(key="2:b", vm="b", uuid="u-b", action=Action.EXPORT_IMPORT, source="host-1",
                  target="host-2")  # fmt: skip
UPGRADE = StepPlan(key="3:c", vm="c", uuid="u-c", action=Action.IN_PLACE,
                   source="host-1", target="host-1", min_level=3)  # fmt: skip
DEST = HostSeen("host-2", free_memory=1024 * M, functional_level=3, max_config_version=3,
                networks=frozenset({"lab"}))  # fmt: skip


def vm(name: str = "a", host: str = "host-1", state: str = "running", **kw: object) -> VmSeen:
    fields: dict[str, object] = {"memory": 256 * M, "config_version": 2, "uuid": f"u-{name}"}
    fields.update(kw)
    return VmSeen(name=name, host=host, state=state, **fields)  # type: ignore[arg-type]


def running(record: StepRecord, job: str = "j1") -> StepRecord:
    return advance(record, StepOp.START, job_id=job, job_host="host-1")


# -- life cycle -------------------------------------------------------------------------


def test_a_step_goes_pending_running_done_and_stays_done() -> None:
    rec = running(StepRecord("1:a"))
    assert rec.state is StepState.RUNNING and rec.job_id == "j1"
    done = advance(rec, StepOp.FINISH, result={"downtime_ms": 40})
    assert done.state is StepState.DONE
    for op in (StepOp.START, StepOp.FAIL, StepOp.LOSE, StepOp.RETRY):
        with pytest.raises(StateError, match="plan step 1:a"):
            advance(done, op)


def test_a_lost_job_sends_the_step_back_to_pending_without_its_job() -> None:
    lost = advance(running(StepRecord("1:a")), StepOp.LOSE)
    assert (lost.state, lost.job_id, lost.job_host) == (StepState.PENDING, None, None)


def test_a_failed_step_is_retried_by_a_later_apply() -> None:
    failed = advance(running(StepRecord("1:a")), StepOp.FAIL, error="boom")
    assert failed.state is StepState.FAILED and failed.error == "boom"
    again = advance(failed, StepOp.RETRY)
    assert again.state is StepState.PENDING and again.error is None


def test_the_state_file_round_trips_and_belongs_to_one_plan() -> None:
    state = ApplyState.fresh("sha256:x", ["1:a", "2:b"])
    state = state.put(advance(running(state.record("1:a")), StepOp.FINISH))
    doc = state.to_json()
    assert ApplyState.load(doc, "sha256:x", ["1:a", "2:b"]) == state
    assert ApplyState.load(doc, "sha256:other", ["1:a", "2:b"]).count(StepState.DONE) == 0
    assert not state.all_done and state.count(StepState.DONE) == 1


def test_plan_steps_map_to_actions_and_copy_cluster_roles_is_refused() -> None:
    pre = Preconditions(vm_uuid="u-a", vm_host="host-1", config_version=2, state="running",
                        must_be_running=True, destination_functional_level=2,
                        networks=["lab"])  # fmt: skip
    step = Step(order=1, vm="a", option=Option.LIVE_MIGRATION, reason="r", estimate_s=1,
                downtime_s=0.1, source="host-1", destination="host-2", storage="shared",
                preconditions=pre)  # fmt: skip
    plan = step_plan(step)
    assert (plan.key, plan.action, plan.storage, plan.must_run, plan.networks) == (
        "1:a",
        Action.LIVE_MOVE,
        "shared",
        True,
        ("lab",),
    )
    assert step_key(step) == "1:a"
    assert (plan.needs_memory, plan.downtime_limit_ms) == (False, None)
    limited = step_plan(
        step.model_copy(
            update={
                "downtime_limit_ms": 500,
                "preconditions": pre.model_copy(update={"destination_free_memory": 256 * M}),
            }
        )
    )
    assert (limited.needs_memory, limited.downtime_limit_ms) == (True, 500)
    ccr = step.model_copy(update={"option": Option.COPY_CLUSTER_ROLES})
    with pytest.raises(InvalidInputError, match=r"copy-cluster-roles.*by hand"):
        step_plan(ccr)
    into_cluster = step.model_copy(update={"destination_cluster": "c2"})
    with pytest.raises(InvalidInputError, match=r"into cluster c2, which plan apply cannot"):
        step_plan(into_cluster)


# -- resume decisions ---------------------------------------------------------------------


def test_a_done_step_is_skipped_whatever_the_world_says() -> None:
    done = advance(running(StepRecord("1:a")), StepOp.FINISH)
    assert decide(MOVE, done, None, [vm(host="host-1")])[0] is Decision.SKIP


def test_a_pending_step_runs_when_its_vm_is_on_the_source() -> None:
    assert decide(MOVE, StepRecord("1:a"), None, [vm()])[0] is Decision.RUN


def test_a_pending_step_is_done_when_its_vm_is_already_on_the_destination() -> None:
    decision, why = decide(MOVE, StepRecord("1:a"), None, [vm(host="host-2")])
    assert decision is Decision.MARK_DONE and "already on host-2" in why


def test_a_running_job_found_again_is_awaited() -> None:
    job = JobSeen("j1", "copying-memory")
    decision, why = decide(MOVE, running(StepRecord("1:a")), job, [vm(state="migrating")])
    assert decision is Decision.AWAIT and "j1" in why


def test_a_job_that_finished_while_apply_was_away_marks_the_step_done() -> None:
    job = JobSeen("j1", "done")
    assert decide(MOVE, running(StepRecord("1:a")), job, [vm(host="host-2")])[0] is \
        Decision.MARK_DONE  # fmt: skip


def test_a_job_that_failed_unwatched_runs_again_if_its_vm_is_where_it_was() -> None:
    job = JobSeen("j1", "failed", error="the agent restarted during the move")
    assert decide(MOVE, running(StepRecord("1:a")), job, [vm()])[0] is Decision.RUN
    lost = [vm(host="host-3")]
    decision, why = decide(MOVE, running(StepRecord("1:a")), job, lost)
    assert decision is Decision.MARK_FAILED and "agent restarted" in why


def test_a_cancelled_job_with_the_vm_still_on_its_source_runs_again() -> None:
    job = JobSeen("j1", "cancelled")
    assert decide(MOVE, running(StepRecord("1:a")), job, [vm()])[0] is Decision.RUN


def test_a_vanished_job_is_judged_from_where_the_vm_is() -> None:
    rec = running(StepRecord("1:a"))
    assert decide(MOVE, rec, None, [vm(host="host-2")])[0] is Decision.MARK_DONE
    assert decide(MOVE, rec, None, [vm(host="host-1")])[0] is Decision.RUN
    # Two settled copies: something else happened; apply does not guess.
    half = [vm(host="host-1"), vm(host="host-2", state="off")]
    decision, why = decide(MOVE, rec, None, half)
    assert decision is Decision.MARK_FAILED and "half way (copies on host-1, host-2)" in why


def test_an_arriving_copy_does_not_count_as_arrived() -> None:
    seen = [vm(host="host-1", state="migrating"), vm(host="host-2", incoming=True)]
    assert decide(MOVE, StepRecord("1:a"), None, seen)[0] is Decision.RUN


def test_a_replica_on_the_destination_is_not_the_vm() -> None:
    seen = [vm(host="host-2", state="replica")]
    assert decide(MOVE, StepRecord("1:a"), None, seen)[0] is Decision.RUN


def test_an_export_import_step_goes_on_after_its_export_job_finished() -> None:
    rec = advance(StepRecord("2:b"), StepOp.START, job_id="e1", job_host="host-1",
                  phase="export")  # fmt: skip
    seen = [vm("b", state="off")]
    assert decide(EXPORT, rec, JobSeen("e1", "done"), seen)[0] is Decision.RUN
    assert decide(EXPORT, rec, JobSeen("e1", "done"), [vm("b", host="host-2", state="off")])[
        0] is Decision.MARK_DONE  # fmt: skip


def test_an_in_place_step_of_an_off_vm_is_done_once_the_version_is_reached() -> None:
    off = {"state": "off", "pid": None}
    assert decide(UPGRADE, StepRecord("3:c"), None, [vm("c", config_version=2, **off)])[0] is \
        Decision.RUN  # fmt: skip
    assert in_place_work(UPGRADE, vm("c", config_version=2, **off), None) == (False, True)
    decision, why = decide(UPGRADE, StepRecord("3:c"), None, [vm("c", config_version=3, **off)])
    assert decision is Decision.MARK_DONE and why == "VM c is upgraded in place on host-1"


def test_an_in_place_step_of_a_running_vm_refreshes_it_and_is_done_after_the_refresh() -> None:
    # Running at the host's version already: the step is the move into a fresh QEMU.
    now = vm("c", config_version=3, pid=100)
    assert in_place_work(UPGRADE, now, None) == (True, False)
    assert decide(UPGRADE, StepRecord("3:c"), None, [now])[0] is Decision.RUN
    # The pid the step found is recorded before the refresh is asked for: a resumed
    # apply that sees another pid does not refresh again, whatever the record's phase.
    asked = advance(StepRecord("3:c"), StepOp.START, phase="refresh", result={"from_pid": 100})
    assert decide(UPGRADE, asked, None, [now])[0] is Decision.RUN
    assert decide(UPGRADE, asked, None, [vm("c", config_version=3, pid=200)])[0] is \
        Decision.MARK_DONE  # fmt: skip
    told = replace(asked, result={"from_pid": 100, "refreshed": True})
    assert decide(UPGRADE, told, None, [now])[0] is Decision.MARK_DONE
    # Still moving (its state says migrating): not done yet.
    assert decide(UPGRADE, asked, None, [vm("c", "host-1", "migrating", config_version=3,
                                            pid=200)])[0] is Decision.RUN  # fmt: skip


def test_a_running_vm_below_the_level_is_refreshed_but_not_upgraded_live() -> None:
    # Every configuration version has its own machine type: raising it live would change
    # the guest's hardware, which the agent refuses; an off VM is upgraded.
    assert in_place_work(UPGRADE, vm("c", config_version=2, pid=100), None) == (True, False)
    assert not upgrade_allowed("running", 2, 3) and not upgrade_allowed("paused", 2, 3)
    assert upgrade_allowed("off", 2, 3) and upgrade_allowed("crashed", 1, 3)
    assert not upgrade_allowed("off", 3, 3)
    after = advance(StepRecord("3:c"), StepOp.START, result={"from_pid": 100, "refreshed": True})
    assert decide(UPGRADE, after, None, [vm("c", config_version=2, pid=200)])[0] is \
        Decision.MARK_DONE  # fmt: skip


def test_an_in_place_refresh_needs_room_for_the_second_qemu() -> None:
    here = HostSeen("host-1", free_memory=128 * M, functional_level=3, max_config_version=3)
    line = precheck(UPGRADE, [vm("c", config_version=3, pid=1)], here)
    assert line is not None and line.startswith("host-1 lacks the capacity for VM c")
    assert precheck(UPGRADE, [vm("c", state="off", config_version=2)], here) is None
    roomy = HostSeen("host-1", free_memory=1024 * M, functional_level=3, max_config_version=3)
    assert precheck(UPGRADE, [vm("c", config_version=3, pid=1)], roomy) is None


# -- prechecks ------------------------------------------------------------------------------


def test_precheck_passes_when_the_world_is_as_planned() -> None:
    assert precheck(MOVE, [vm()], DEST) is None


@pytest.mark.parametrize(
    ("seen", "dest", "words"),
    [
        (None, DEST, "on no host now"),
        (vm(host="host-3"), DEST, "on host-3, not on host-1"),
        (vm(), None, "host-2 cannot be reached"),
        (vm(state="off"), DEST, "needs it running"),
        (vm(busy="a replication cycle"), DEST, "busy (a replication cycle)"),
        (
            vm(memory=2048 * M),
            DEST,
            "lacks the capacity for VM a: it needs 2G of memory and host-2 has 1G free",
        ),
        (vm(config_version=4), DEST, "versions up to 3"),
    ],
)
def test_precheck_refuses_with_one_line(seen: VmSeen | None, dest: HostSeen | None,
                                        words: str) -> None:  # fmt: skip
    why = precheck(MOVE, [] if seen is None else [seen], dest)
    assert why is not None and words in why and "\n" not in why


def test_precheck_asks_memory_only_for_a_vm_that_will_run_on_the_destination() -> None:
    big = 2048 * M
    assert precheck(EXPORT, [vm("b", state="off", memory=big)], DEST) is None
    assert precheck(EXPORT, [vm("b", state="crashed", memory=big)], DEST) is None
    why = precheck(EXPORT, [vm("b", memory=big)], DEST)
    assert why is not None and "lacks the capacity for VM b" in why
    why = precheck(replace(EXPORT, needs_memory=True), [vm("b", state="off", memory=big)], DEST)
    assert why is not None and "lacks the capacity for VM b" in why
    off_move = replace(MOVE, must_run=False)
    assert precheck(off_move, [vm(state="off", memory=big)], DEST) is None


def test_precheck_needs_the_networks_and_level_of_the_step() -> None:
    step = StepPlan(key="1:a", vm="a", uuid="u-a", action=Action.LIVE_MOVE, source="host-1",
                    target="host-2", must_run=True, networks=("lab", "dmz"),
                    min_level=4)  # fmt: skip
    why = precheck(step, [vm()], DEST)
    assert why is not None and "functional level 3" in why
    why = precheck(StepPlan(**{**step.__dict__, "min_level": 0}), [vm()], DEST)
    assert why is not None and "lacks network dmz" in why


def test_the_whole_plan_is_checked_for_capacity_in_order() -> None:
    # b runs: its export/import starts it again on host-2, where a took 600M already.
    a, b = vm("a", memory=600 * M), vm("b", memory=600 * M)
    hosts = {"host-1": HostSeen("host-1", 0, 3, 3), "host-2": DEST}
    why = capacity_shortfall([MOVE, EXPORT], [a, b], hosts)
    assert why is not None and "capacity for VM b" in why and "has 424M free" in why
    assert capacity_shortfall([MOVE], [a, b], hosts) is None
    # Off, it lands off and takes no memory there (as the planner counts it)...
    off = vm("b", state="off", memory=600 * M)
    assert capacity_shortfall([MOVE, EXPORT], [a, off], hosts) is None
    # ...unless the plan has it running there.
    restarted = replace(EXPORT, needs_memory=True)
    why = capacity_shortfall([MOVE, restarted], [a, off], hosts)
    assert why is not None and "capacity for VM b" in why
    # Moving a VM off a host frees its memory there for one moving in after it.
    back = StepPlan(key="2:b", vm="b", uuid="u-b", action=Action.EXPORT_IMPORT,
                    source="host-2", target="host-1")  # fmt: skip
    b_on_2 = vm("b", host="host-2", memory=600 * M)
    assert capacity_shortfall([MOVE, back], [a, b_on_2], hosts) is None


def test_precheck_names_the_hosts_of_a_vm_found_twice() -> None:
    why = precheck(MOVE, [vm(), vm(host="host-2", state="migrating")], DEST)
    assert why is not None and "on several hosts (host-1, host-2)" in why


def test_a_replica_move_follows_the_replica_copy_only() -> None:
    step = StepPlan(key="1:r", vm="r", uuid="u-r", action=Action.MOVE_REPLICA, source="host-2",
                    target="host-3")  # fmt: skip
    primary = vm("r", host="host-1")
    before = [primary, vm("r", host="host-2", state="replica")]
    assert decide(step, StepRecord("1:r"), None, before)[0] is Decision.RUN
    moved = [primary, vm("r", host="host-3", state="replica")]
    assert decide(step, StepRecord("1:r"), None, moved)[0] is Decision.MARK_DONE
    tiny = HostSeen("host-3", free_memory=0, functional_level=3, max_config_version=3)
    assert precheck(step, before, tiny) is None


def test_precheck_needs_the_cpu_model_the_plan_asked_for() -> None:
    from ferry.core.cpu_models import CpuFacts, CpuModel

    step = StepPlan(key="1:a", vm="a", uuid="u-a", action=Action.LIVE_MOVE, source="host-1",
                    target="host-2", must_run=True, cpu_model="Haswell-v4")  # fmt: skip
    cpu = CpuFacts(host="host-2", models=(
        CpuModel(name="Haswell-v4", runnable=False, unavailable_features=("pcid",)),))  # fmt: skip
    why = precheck(step, [vm()], HostSeen("host-2", 1024 * M, 3, 3, cpu=cpu))
    assert why is not None and "lacks feature pcid" in why and "VM a uses it" in why
    assert precheck(step, [vm()], DEST) is None  # a host that does not report its models


@pytest.mark.parametrize(
    ("steps", "words"),
    [
        ([{"state": "done"}], "a step has no 'key'"),
        ([{"key": "1:a", "state": "halfway"}], "'halfway' is not a valid StepState"),
        ({"1:a": "done"}, "its steps are a dict, not a list"),
        (["1:a"], "damaged"),
        ([{"key": "1:a", "state": "done", "result": 5}], "damaged"),
    ],
)
def test_a_damaged_state_file_is_refused_with_one_line(steps: object, words: str) -> None:
    doc = {"format": 1, "plan_digest": "sha256:x", "steps": steps}
    with pytest.raises(StorageError) as caught:
        ApplyState.load(doc, "sha256:x", ["1:a"], source="apply state p.json.state")
    line = str(caught.value)
    assert words in line and "move it away to start over" in line and "\n" not in line
    assert line.startswith("cannot read apply state p.json.state: it is damaged")
