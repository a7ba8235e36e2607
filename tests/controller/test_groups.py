"""Multi-node runs are one group: a pod that stops takes the rest of its attempt with it, and the
group's result is rank 0's."""

from __future__ import annotations

from kubetune.controller.status import broken_group, observe

INDEXED = {"spec": {"completionMode": "Indexed", "completions": 2}, "status": {}}


def _pod(name: str, phase: str, created: str, finished: str | None = None, message: str = "") -> dict:
    status: dict = {"phase": phase}
    if finished:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": 0 if phase == "Succeeded" else 1, "finishedAt": finished, "message": message}}}]
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": status}


def test_survivors_of_a_failed_rank_are_stopped_and_its_replacement_is_not():
    rank0 = _pod("job-0-a", "Running", "2026-11-23T10:00:00Z")
    rank1 = _pod("job-1-a", "Failed", "2026-11-23T10:00:00Z", finished="2026-11-23T10:30:00Z")
    replacement = _pod("job-1-b", "Pending", "2026-11-23T10:30:05Z")
    assert broken_group(INDEXED, [rank0, rank1, replacement]) == [rank0]
    # Once rank 0 is on its way out (or replaced too), nothing more is stopped.
    rank0["metadata"]["deletionTimestamp"] = "2026-11-23T10:30:06Z"
    assert broken_group(INDEXED, [rank0, rank1, replacement]) == []
    new0 = _pod("job-0-b", "Running", "2026-11-23T10:30:10Z")
    assert broken_group(INDEXED, [rank1, replacement, new0]) == []


def test_single_pod_jobs_and_healthy_groups_are_left_alone():
    running = [_pod("job-0", "Running", "2026-11-23T10:00:00Z"), _pod("job-1", "Running", "2026-11-23T10:00:00Z")]
    assert broken_group(INDEXED, running) == []
    failed_single = [_pod("job-a", "Failed", "2026-11-23T10:00:00Z", finished="2026-11-23T10:10:00Z"),
                     _pod("job-b", "Running", "2026-11-23T10:00:30Z")]
    assert broken_group({"spec": {"completions": 1}}, failed_single) == []


def test_the_group_result_is_rank_zeros_termination_message():
    done = {"spec": INDEXED["spec"], "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    rank0 = _pod("job-0", "Succeeded", "2026-11-23T10:00:00Z", finished="2026-11-23T11:00:00Z",
                 message='{"manifest": "s3://a/run/manifest.json", "manifestSha256": "ab"}')
    rank1 = _pod("job-1", "Succeeded", "2026-11-23T10:00:01Z", finished="2026-11-23T11:00:02Z")
    obs = observe(False, done, [rank0, rank1])
    assert obs.phase == "Succeeded" and obs.result["manifestSha256"] == "ab"
