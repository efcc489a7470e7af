"""The sandbox every container runs in, as the docker SDK arguments that build it."""

from pathlib import Path

import pytest
from docker.types import DeviceRequest

from site_worker.containers import (
    ContainerError,
    DockerRunner,
    FakeRunner,
    Limits,
    Mount,
    RunOutcome,
    RunSpec,
    sandbox_kwargs,
    sandbox_user,
    seal,
)

IMAGE = "sha256:" + "ab" * 32
USER = "65534:65534"


def spec(**changes) -> RunSpec:
    fields = dict(
        image=IMAGE,
        task="infer",
        mounts=(Mount(Path("/site/data"), "/assay/data"), Mount(Path("/site/out"), "/assay/out", writable=True)),
        env={"ASSAY_JOB_ID": "job-1"},
        limits=Limits(memory="1g", nano_cpus=1_000_000_000, pids=64, timeout_s=30),
    )
    return RunSpec(**(fields | changes))


def test_every_run_gets_the_whole_sandbox():
    kwargs = sandbox_kwargs(spec(), USER)

    assert kwargs["image"] == IMAGE
    assert kwargs["network_mode"] == "none"
    assert kwargs["read_only"] is True
    assert "/tmp" in kwargs["tmpfs"]
    assert kwargs["cap_drop"] == ["ALL"]
    assert kwargs["security_opt"] == ["no-new-privileges"]
    assert kwargs["user"] == USER
    assert (kwargs["mem_limit"], kwargs["nano_cpus"], kwargs["pids_limit"]) == ("1g", 1_000_000_000, 64)
    assert kwargs["memswap_limit"] == "1g"


def test_the_entrypoint_gets_the_task_as_argument_and_in_the_environment():
    kwargs = sandbox_kwargs(spec(task="evaluate"), USER)

    assert kwargs["command"] == ["evaluate"]
    assert kwargs["environment"]["ASSAY_TASK"] == "evaluate"
    assert kwargs["environment"]["ASSAY_JOB_ID"] == "job-1"


def test_a_job_cannot_override_the_task_in_the_environment():
    kwargs = sandbox_kwargs(spec(env={"ASSAY_TASK": "something-else"}), USER)

    assert kwargs["environment"]["ASSAY_TASK"] == "infer"


def test_mounts_are_read_only_binds_unless_marked_writable():
    mounts = {m["Target"]: m for m in sandbox_kwargs(spec(), USER)["mounts"]}

    assert mounts["/assay/data"]["Type"] == "bind"
    assert mounts["/assay/data"]["Source"] == "/site/data"
    assert mounts["/assay/data"]["ReadOnly"] is True
    assert mounts["/assay/out"]["ReadOnly"] is False


NOT_IDS = ["assay-demo/model:1", "model@sha256:" + "ab" * 32, "sha256:abc", "SHA256:" + "AB" * 32]


@pytest.mark.parametrize("ref", NOT_IDS)
def test_an_image_reference_that_is_not_an_image_id_is_refused(ref):
    with pytest.raises(ContainerError, match="never by tag") as refused:
        sandbox_kwargs(spec(image=ref), USER)

    assert ref in str(refused.value) and "infer" in str(refused.value)


def test_the_fake_runner_refuses_a_tag_like_the_real_one():
    runner = FakeRunner(["assay-demo/model:1"])

    with pytest.raises(ContainerError):
        runner.run(spec(image="assay-demo/model:1"))
    assert runner.specs == []


def test_no_gpu_is_requested_unless_the_job_asks():
    kwargs = sandbox_kwargs(spec(), USER)

    assert "device_requests" not in kwargs
    assert kwargs["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_a_gpu_job_gets_exactly_the_devices_it_asked_for():
    kwargs = sandbox_kwargs(spec(gpus=("0", "2")), USER)

    assert kwargs["device_requests"] == [DeviceRequest(device_ids=["0", "2"], capabilities=[["gpu"]])]
    assert kwargs["environment"]["NVIDIA_VISIBLE_DEVICES"] == "0,2"


def test_a_run_outcome_is_ok_only_for_a_clean_exit():
    assert RunOutcome(0, "").ok
    assert not RunOutcome(1, "").ok
    assert not RunOutcome(0, "", timed_out=True).ok
    assert not RunOutcome(0, "", oom_killed=True).ok


def test_the_fake_runner_records_specs_runs_actions_and_plays_scripted_outcomes(tmp_path):
    runner = FakeRunner()
    image = runner.add_image("assay-demo/model:1")
    runner.on("infer", lambda s: (s.source_of("/assay/out") / "predictions.csv").write_text("case_id,score\n"))
    runner.script("infer", RunOutcome(exit_code=3, log_tail="boom"))
    run = spec(image=image, mounts=(Mount(tmp_path, "/assay/out", writable=True),))

    first, second = runner.run(run), runner.run(run)

    assert (first.exit_code, first.log_tail) == (3, "boom")
    assert second.ok
    assert (tmp_path / "predictions.csv").is_file()
    assert runner.specs == [run, run]
    assert runner.image_id("assay-demo/model:1") == image and runner.image_id(image) == image


def test_an_action_that_raises_fails_like_a_crashing_container():
    runner = FakeRunner()
    image = runner.add_image("assay-demo/model:1")
    runner.on("infer", lambda s: 1 / 0)

    outcome = runner.run(spec(image=image, mounts=()))

    assert not outcome.ok and "ZeroDivisionError" in outcome.log_tail


@pytest.mark.parametrize(("euid", "egid", "expected"), [(0, 0, "65534:65534"), (1000, 1001, "1000:1001")])
def test_a_container_runs_as_the_workers_own_user_and_never_as_root(monkeypatch, euid, egid, expected):
    monkeypatch.setattr("os.geteuid", lambda: euid)
    monkeypatch.setattr("os.getegid", lambda: egid)

    assert sandbox_user() == expected


def test_a_worker_that_is_not_root_cannot_hand_its_outputs_to_another_user(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)

    with pytest.raises(ValueError, match="only when the worker runs as root or as that user"):
        DockerRunner(client=None, user="65534:65534")  # type: ignore[arg-type]


def test_sealing_leaves_every_file_to_its_owner_and_follows_no_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("not the container's")
    outside.chmod(0o644)
    out = tmp_path / "out"
    (out / "a" / "b").mkdir(parents=True)
    (out / "a" / "b" / "scores.csv").write_text("case_id,score")
    for path, mode in ((out, 0o777), (out / "a", 0o777), (out / "a" / "b", 0o755), (out / "a/b/scores.csv", 0o666)):
        path.chmod(mode)
    (out / "link").symlink_to(outside)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    (out / "a" / "dirlink").symlink_to(elsewhere)

    seal(out)

    modes = {str(p.relative_to(out)): p.lstat().st_mode & 0o777 for p in (out, *out.rglob("*")) if not p.is_symlink()}
    assert modes == {".": 0o700, "a": 0o700, "a/b": 0o700, "a/b/scores.csv": 0o600}
    assert outside.stat().st_mode & 0o777 == 0o644 and elsewhere.stat().st_mode & 0o777 == 0o755
