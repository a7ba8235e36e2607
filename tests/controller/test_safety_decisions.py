"""The pure decisions behind data safety (issue 26): what an adapter may delete, how a re-run is
registered, how long a name may be, how deep a spec may nest, how long a message may grow, and
counters and phases that never go backwards."""

from __future__ import annotations

import pytest

from kubetune.api.validation import Problem, validate_object
from kubetune.controller.artifacts import UnsafeManifest, deletion_keys, fingerprint
from kubetune.controller.jobs import configmap_name, job_name
from kubetune.api import FineTuneJob
from kubetune.api.loraadapter import LoraAdapterSpec
from kubetune.controller.registry import adapter_version, merge_request
from kubetune.controller.status import (MESSAGE_LIMIT, Counters, Observation, cancellation, count_pods, join_problems,
                                        merge_patch, observe, settle_phase, status_patch)
from kubetune.storage.location import ObjectInfo
from kubetune.storage.manifest import MANIFEST, FileEntry, Manifest
from tests.api.test_invalid_specs import ADAPTER
from tests.support import minimal_job, patched

# 1. Deletion: the manifest first, then exactly the files it lists; nothing outside the prefix.


def test_deletion_removes_the_manifest_first_then_only_its_files():
    manifest = Manifest("RunManifest", [FileEntry("adapter/b.safetensors", 2, "b" * 64),
                                        FileEntry("adapter/a.json", 1, "a" * 64)])
    assert deletion_keys(manifest) == [MANIFEST, "adapter/b.safetensors", "adapter/a.json"]


@pytest.mark.parametrize("path", ["../other-run/manifest.json", "/abs", "adapter/../../x", "", "a//b"])
def test_a_manifest_naming_objects_outside_its_run_deletes_nothing(path):
    with pytest.raises(UnsafeManifest, match="adapter/ok"):
        deletion_keys(Manifest("RunManifest", [FileEntry("adapter/ok", 1, "a" * 64), FileEntry(path, 1, "b" * 64)]))


@pytest.mark.parametrize("kind", ["ModelManifest", "CheckpointManifest"])
def test_only_a_run_manifest_can_be_deleted_by_an_adapter(kind):
    with pytest.raises(UnsafeManifest, match=kind):
        deletion_keys(Manifest(kind, [FileEntry("model.safetensors", 1, "a" * 64)]))


@pytest.mark.parametrize("uri", ["s3://victim", "s3://victim/", "pvc://claim", "pvc://claim/"])
def test_a_bucket_or_claim_root_is_no_artifact(uri):
    spec = {"artifact": {"uri": uri}, **({"storage": {"secretRef": {"name": "s"}}} if uri.startswith("s3") else {})}
    _, problems = validate_object(patched(ADAPTER, {"spec": spec}))
    assert problems == [Problem("spec.artifact.uri", "must name a prefix inside the bucket or claim, not its root")]


# 6. The cheap periodic check: the manifest's sha256 and the listing's sizes and ETags.

def test_the_fingerprint_changes_with_any_listed_object_and_only_those():
    files = [FileEntry("adapter/a", 3, "a" * 64), FileEntry("adapter/b", 4, "b" * 64)]
    listing = [ObjectInfo("adapter/a", 3, "e1"), ObjectInfo("adapter/b", 4, "e2"), ObjectInfo("notes.txt", 1, "e3")]
    base = fingerprint("m" * 64, files, listing)
    assert fingerprint("m" * 64, files, listing[:2]) == base  # objects the manifest does not list do not count
    assert fingerprint("n" * 64, files, listing) != base
    assert fingerprint("m" * 64, files, [listing[0], ObjectInfo("adapter/b", 4, "e9")]) != base
    assert fingerprint("m" * 64, files, [listing[0], ObjectInfo("adapter/b", 5, "e2")]) != base
    assert fingerprint("m" * 64, files, listing[:1]) != base


# 2. A re-run registers a new version; the same run is adopted, never duplicated.

def _adapter(name, version, uri, base="x"):
    return {"metadata": {"name": name}, "spec": {"adapterName": base, "version": version, "artifact": {"uri": uri}}}


def test_the_first_run_takes_the_plain_name():
    assert adapter_version("x", "s3://b/x-1", []) == ("x", 1, None)


def test_a_new_run_takes_the_next_version_and_the_same_run_is_adopted():
    existing = [_adapter("x", 1, "s3://b/x-1"), _adapter("x-v2", 2, "s3://b/x-2")]
    assert adapter_version("x", "s3://b/x-3", existing) == ("x-v3", 3, None)
    assert adapter_version("x", "s3://b/x-2", existing) == ("x-v2", 2, existing[1])


@pytest.mark.parametrize("spec,merge", [
    ({"output": {"uri": "pvc://runs/job", "merge": False}}, {"enabled": False}),
    ({"resources": {"gpus": 0}}, {"enabled": True, "dtype": "float32"}),
    ({"resources": {"gpus": 2}}, {"enabled": True, "dtype": "bfloat16"}),
    ({"output": {"uri": "pvc://runs/job", "merge": False, "gguf": {"enabled": True, "types": ["q8_0", "q8_0"]}},
      "resources": {"gpus": 1}}, {"enabled": True, "dtype": "bfloat16", "gguf": ["q8_0"]}),
])
def test_the_runs_merge_and_gguf_are_its_adapters_merge_job(spec, merge):
    """The training pods never merge: the adapter asks its merge Job, at the training pods' precision."""
    job = FineTuneJob.model_validate(minimal_job(**spec))
    assert merge_request(job) == merge
    assert LoraAdapterSpec.model_validate({"baseModel": {"uri": "pvc://models/m"}, "artifact": {"uri": "pvc://r/x"},
                                           "merge": merge}).merge.enabled == merge["enabled"]


def test_a_versioned_name_stays_within_63_characters():
    base = "a" * 63
    name, version, _ = adapter_version(base, "s3://b/r2", [_adapter(base, 1, "s3://b/r1", base)])
    assert version == 2 and len(name) <= 63 and name.endswith("-v2")


def test_a_name_taken_by_an_unrelated_adapter_is_skipped():
    existing = [_adapter("x", 1, "s3://b/x-1"), _adapter("x-v2", 1, "s3://b/hand-made", base="other")]
    assert adapter_version("x", "s3://b/x-3", existing)[:2] == ("x-v3", 3)


# 5. Names: what Kubernetes cannot carry as a label value is refused; derived names are shortened.

def _named(name, **spec):
    return patched(minimal_job(**spec), {"metadata": {"name": name}})


def test_a_finetunejob_name_must_fit_a_label_value():
    assert validate_object(_named("a" * 63))[1] == []
    assert validate_object(_named("a" * 64))[1] == [Problem(
        "metadata.name", "must be at most 63 characters (it is the value of the kubetune.dev/finetunejob label)")]


def test_an_adapter_name_must_fit_a_label_value():
    assert validate_object(_named("a", output={"uri": "pvc://runs/x", "adapterName": "b" * 63}))[1] == []
    _, problems = validate_object(_named("a", output={"uri": "pvc://runs/x", "adapterName": "b" * 64}))
    assert [p.path for p in problems] == ["spec.output.adapterName"]
    assert validate_object(patched(ADAPTER, {"metadata": {"name": "a" * 63}}))[1] == []
    assert [p.path for p in validate_object(patched(ADAPTER, {"metadata": {"name": "a" * 64}}))[1]] == ["metadata.name"]


def test_derived_names_at_the_limit_are_shortened_and_stay_distinct():
    a, b = "a" * 62 + "b", "a" * 62 + "c"
    for derive in (job_name, configmap_name):
        assert len(derive(a)) <= 63 and len(derive(b)) <= 63 and derive(a) != derive(b)


# 8. Nesting depth.

def test_a_deeply_nested_affinity_is_refused_with_its_path():
    deep: dict = {"leaf": 1}
    for _ in range(40):
        deep = {"x": deep}
    _, problems = validate_object(minimal_job(resources={"affinity": deep}))
    assert problems == [Problem("spec.resources.affinity", "nested deeper than 32 levels")]
    real = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}}
    assert validate_object(minimal_job(resources={"affinity": real}))[1] == []


# 7. Messages fit the CRD's 32,768 characters and say how many problems were left out.

def test_join_problems_caps_and_counts_what_it_left_out():
    problems = [f"spec.x.k{i}: input should be a valid string" for i in range(5000)]
    message = join_problems(problems)
    assert len(message) <= MESSAGE_LIMIT
    shown = message.split("; ")[:-1]
    assert shown == problems[:len(shown)]
    assert message.endswith(f"and {5000 - len(shown)} more problem(s) not shown")
    assert join_problems(problems[:3]) == "; ".join(problems[:3])


# 9. Counters only grow; the phase never goes back.

def _pod(uid, phase, exit_code=None, created="2026-01-01T00:00:00Z"):
    state = {"running": {}} if exit_code is None else {"terminated": {"exitCode": exit_code}}
    return {"metadata": {"uid": uid, "name": uid, "creationTimestamp": created},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}


def test_counters_survive_the_pods_that_counted_them():
    counters = count_pods(Counters(), [_pod("a", "Failed", 75), _pod("b", "Failed", 1), _pod("c", "Running")])
    assert (counters.attempts, counters.failures, counters.preemptions) == (3, 1, 1)
    assert count_pods(counters, [_pod("a", "Failed", 75), _pod("b", "Failed", 1), _pod("c", "Running")]) == counters
    suspended = count_pods(counters, [])  # suspension deleted every pod
    assert (suspended.attempts, suspended.failures, suspended.preemptions) == (3, 1, 1)
    resumed = count_pods(suspended, [_pod("d", "Running")])
    assert (resumed.attempts, resumed.failures, resumed.preemptions) == (4, 1, 1)
    finished = count_pods(resumed, [_pod("d", "Failed", 1)])
    assert (finished.attempts, finished.failures, finished.preemptions) == (4, 2, 1)


def test_a_running_pod_being_stopped_counts_as_preempted_once():
    """Kueue suspends the Job, the pod gets SIGTERM and is deleted: its exit 75 may never be listed."""
    running = count_pods(Counters(), [_pod("a", "Running")])
    stopping = _pod("a", "Running")
    stopping["metadata"]["deletionTimestamp"] = "2026-01-01T00:05:00Z"
    counters = count_pods(running, [stopping])
    assert (counters.attempts, counters.failures, counters.preemptions) == (1, 0, 1)
    exited = count_pods(counters, [_pod("a", "Failed", 75)])  # when its exit is seen after all
    assert (exited.attempts, exited.failures, exited.preemptions) == (1, 0, 1)
    killed = count_pods(counters, [_pod("a", "Failed", 137)])  # or killed at the end of its grace period
    assert (killed.attempts, killed.failures, killed.preemptions) == (1, 0, 1)
    assert count_pods(exited, []) == Counters(1, 0, 1, ())  # and gone


def test_a_pod_that_has_not_run_is_no_attempt_yet():
    counters = count_pods(Counters(), [_pod("a", "Pending")])
    assert counters.attempts == 0
    assert count_pods(counters, [_pod("a", "Running")]).attempts == 1


def test_a_finished_pod_before_the_job_completes_keeps_the_run_running():
    job = {"spec": {"suspend": False}, "status": {}}
    obs = observe(False, job, [_pod("a", "Succeeded", 0)])
    assert settle_phase("Running", True, obs).phase == "Running"


@pytest.mark.parametrize("previous,started,observed,expected", [
    ("Running", True, "Pending", "Running"),  # between a pod's end and the next one's start
    ("Pending", False, "Pending", "Pending"),
    ("Running", True, "Suspended", "Suspended"),
    ("Suspended", True, "Pending", "Running"),  # resumed, its pod not yet running
    ("Succeeded", True, "Running", "Succeeded"),
    ("Failed", True, "Pending", "Failed"),
    ("Running", True, "Succeeded", "Succeeded"),
])
def test_the_phase_never_goes_back(previous, started, observed, expected):
    assert settle_phase(previous, started, Observation(observed, "R", "")).phase == expected


def test_a_status_patch_never_lowers_the_counters():
    current = {"attempts": 3, "failures": 1, "preemptions": 2}
    patch = status_patch(current, Observation("Queued", "WaitingForCapacity", ""), 1, "2026-01-01T00:00:00Z")
    assert (patch["attempts"], patch["failures"], patch["preemptions"]) == (3, 1, 2)


def test_a_status_write_is_the_difference_and_nothing_when_unchanged():
    current = {"phase": "Running", "progress": {"step": 3, "loss": 0.5}, "attempts": 1, "conditions": [{"a": 1}]}
    assert merge_patch(current, dict(current)) == {}
    assert merge_patch(current, {**current, "progress": {"step": 4, "loss": 0.5}}) == {"progress": {"step": 4}}
    assert merge_patch(current, {"phase": "Running", "progress": {"step": 3}, "conditions": [{"a": 2}]}) == {
        "progress": {"loss": None}, "attempts": None, "conditions": [{"a": 2}]}


def _status(phase: str, failed_reason: str | None = None) -> dict:
    return {"phase": phase, "conditions": [{"type": "Failed", "status": "True", "reason": failed_reason}]
            if failed_reason else []}


@pytest.mark.parametrize("cancelled_at, status, pods, expected", [
    (None, _status("Running"), [], None),                                # not cancelled
    ("t", _status("Running"), [_pod("u", "Running")], None),             # waits for its pod to checkpoint and stop
    ("t", _status("Suspended"), [_pod("u", "Pending")], None),
    ("t", _status("Succeeded"), [], None),                               # finished before the cancel: keeps its result
    ("t", _status("Failed", "OutOfMemory"), [], None),                   # failed on its own first
    ("t", _status("Suspended"), [_pod("u", "Failed")], "Cancelled"),
    ("t", _status("Queued"), [], "Cancelled"),                           # never ran: nothing to wait for
    ("t", _status("Failed", "Cancelled"), [], "Cancelled"),              # stays cancelled, not Suspended
])
def test_a_cancel_fails_the_job_once_its_pods_stopped(cancelled_at, status, pods, expected):
    obs = cancellation(cancelled_at, status, pods)
    assert (obs and (obs.phase, obs.reason)) == (("Failed", expected) if expected else None)


def _workload(*conditions: tuple[str, str, str, str]) -> dict:
    return {"status": {"conditions": [dict(zip(("type", "status", "reason", "message"), c)) for c in conditions]}}


@pytest.mark.parametrize("workload, expected", [
    (None, ("WaitingForAdmission", "waiting for Kueue to admit the Job")),
    (_workload(("QuotaReserved", "False", "Pending", "insufficient unused quota for nvidia.com/gpu")),
     ("WaitingForQuota", "Kueue: insufficient unused quota for nvidia.com/gpu")),
    (_workload(("QuotaReserved", "False", "Pending", "no quota"), ("Evicted", "True", "Preempted", "by urgent")),
     ("Preempted", "evicted by Kueue: by urgent")),
    (_workload(("Evicted", "False", "Preempted", "earlier")), ("WaitingForAdmission", "waiting for Kueue to admit the Job")),
])
def test_a_job_held_by_kueue_quotes_its_workload(workload, expected):
    job = {"metadata": {"uid": "j"}, "spec": {"suspend": True}, "status": {}}
    obs = observe(False, job, [], workload)
    assert (obs.phase, obs.reason, obs.message) == ("Queued", *expected)


def test_a_negative_eta_from_the_trainer_is_recorded_as_zero_so_the_status_write_is_accepted():
    # A run resumed past its planned steps reported step 32 of 30 and an ETA of -3 s; the CRD's
    # schema refuses a negative etaSeconds, and every status write of the job was refused with it.
    progress = {"phase": "training", "step": 32, "totalSteps": 30, "etaSeconds": -3}
    patch = status_patch({}, Observation("Running", "Running", "", progress=progress), 1, "2026-01-01T00:00:00Z")
    assert (patch["progress"]["etaSeconds"], patch["progress"]["percent"]) == (0, 100)
