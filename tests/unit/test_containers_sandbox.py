"""The sandbox every container runs in, as the docker SDK arguments that build it, and how a run's end is told."""

import os
import threading
from pathlib import Path

import pytest
from docker.types import DeviceRequest, LogConfig, Ulimit

from site_worker.containers import (
    LOG_TAIL_BYTES,
    ContainerError,
    DockerRunner,
    Failure,
    FakeRunner,
    Limits,
    Mount,
    RunOutcome,
    RunSpec,
    classify,
    sandbox_kwargs,
    sandbox_user,
    seal,
    tail_of,
)
from site_worker.watch import Watch, forks_refused, measure, pids_events_file

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


def test_the_engine_keeps_at_most_two_small_log_files_of_a_container():
    kwargs = sandbox_kwargs(spec(), USER)

    assert kwargs["log_config"] == LogConfig(type="json-file", config={"max-size": "1m", "max-file": "2"})


def test_no_file_a_container_writes_can_grow_past_its_output_limit():
    kwargs = sandbox_kwargs(spec(limits=Limits(output_bytes=10 << 20)), USER)

    assert kwargs["ulimits"] == [Ulimit(name="fsize", soft=(10 << 20) + 1, hard=(10 << 20) + 1)]


def test_output_limits_have_defaults_for_a_model_writing_one_table_or_a_file_per_case():
    assert (Limits().output_bytes, Limits().output_files) == (256 << 20, 10_000)


def test_the_log_tail_is_capped_in_bytes_even_for_one_huge_line():
    tail = tail_of(b"start\n" + b"x" * (5 << 20) + "\nlast words \u00e9\n".encode())

    assert len(tail.encode()) <= LOG_TAIL_BYTES and tail.endswith("last words \u00e9\n")


@pytest.mark.parametrize(("exit_code", "timed_out", "oom_killed", "refused_forks", "over", "expected"), [
    (0, False, False, 0, None, None),
    (3, False, False, 0, None, Failure.EXIT_CODE),
    (137, True, False, 0, None, Failure.TIMED_OUT),
    (137, False, True, 0, None, Failure.OUT_OF_MEMORY),
    (137, True, False, 500, None, Failure.TOO_MANY_PROCESSES),  # a fork bomb runs until its timeout
    (1, False, False, 3, None, Failure.TOO_MANY_PROCESSES),  # a crash for want of a thread
    (0, False, False, 3, None, None),  # a thread pool that met the limit and carried on
    (0, False, False, 0, "bytes", Failure.OUTPUT_TOO_LARGE),  # over even with a clean exit
    (137, False, False, 0, "files", Failure.TOO_MANY_FILES),
    (137, True, True, 9, "bytes", Failure.OUTPUT_TOO_LARGE),
])
def test_a_run_is_classified_by_its_cause_first(exit_code, timed_out, oom_killed, refused_forks, over, expected):
    assert classify(exit_code, timed_out, oom_killed, refused_forks, over) is expected


def test_only_a_plain_exit_code_may_be_retried():
    assert [f for f in Failure if not f.recurs] == [Failure.EXIT_CODE]
    assert RunOutcome(exit_code=1, log_tail="x", timed_out=True).recurs
    assert not RunOutcome(exit_code=1, log_tail="x").recurs
    assert not RunOutcome(exit_code=0, log_tail="").recurs


def test_an_outcome_built_from_the_old_fields_gets_its_failure_and_words():
    timed_out = RunOutcome(exit_code=1, log_tail="x", timed_out=True)
    oom = RunOutcome(exit_code=137, log_tail="", oom_killed=True)

    assert (timed_out.failure, timed_out.why) == (Failure.TIMED_OUT, "timed out")
    assert (oom.failure, oom.why) == (Failure.OUT_OF_MEMORY, "killed for exceeding its memory limit")
    assert RunOutcome(exit_code=2, log_tail="").why == "exit code 2"
    assert RunOutcome(exit_code=0, log_tail="").failure is None


LIMITS = Limits(memory="128m", pids=32, timeout_s=3, output_bytes=10 << 20, output_files=1000)


@pytest.mark.parametrize(("failure", "words"), [
    (Failure.TIMED_OUT, "timed out after 3 s"),
    (Failure.OUT_OF_MEMORY, "killed for exceeding its memory limit of 128m"),
    (Failure.TOO_MANY_PROCESSES, "reached its limit of 32 processes"),
    (Failure.OUTPUT_TOO_LARGE, "wrote more than 10 MiB to /assay/out"),
    (Failure.TOO_MANY_FILES, "wrote more than 1,000 files to /assay/out"),
    (Failure.EXIT_CODE, "exit code 1"),
])
def test_a_failure_is_told_with_the_limit_it_reached(failure, words):
    outcome = RunOutcome.failed(failure, LIMITS)

    assert outcome.failure is failure and outcome.why == words and not outcome.ok
    assert outcome.timed_out is (failure is Failure.TIMED_OUT)
    assert outcome.oom_killed is (failure is Failure.OUT_OF_MEMORY)


def test_the_fake_runner_plays_a_scripted_failure_with_the_limits_of_the_spec_that_ran(tmp_path):
    runner = FakeRunner()
    image = runner.add_image("assay-demo/model:1")
    runner.script("infer", Failure.TOO_MANY_PROCESSES, Failure.OUTPUT_TOO_LARGE)
    run = spec(image=image, mounts=(Mount(tmp_path, "/assay/out", writable=True),), limits=LIMITS)

    first, second, third = runner.run(run), runner.run(run), runner.run(run)

    assert (first.failure, first.why, first.exit_code) == (
        Failure.TOO_MANY_PROCESSES, "reached its limit of 32 processes", 137)
    assert second.why == "wrote more than 10 MiB to /assay/out" and second.recurs
    assert third.ok


def test_output_is_measured_without_following_links_and_sparse_files_count_whole(tmp_path):
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "scores.csv").write_bytes(b"x" * 1000)
    with (out / "sparse").open("wb") as stream:
        stream.truncate(1 << 30)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"y" * 5000)
    (out / "link").symlink_to(outside, target_is_directory=True)

    written = measure([out], 1 << 40, 1 << 40)

    assert written.files == 4  # a, a/scores.csv, sparse, link
    assert (1 << 30) + 1000 <= written.bytes < (1 << 30) + 1000 + (64 << 10)
    assert written.over(1 << 30, 10) == "bytes" and written.over(1 << 31, 3) == "files"
    assert written.over(1 << 31, 10) is None


def test_measuring_stops_once_over_the_file_limit(tmp_path):
    for i in range(50):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "f").touch()

    assert measure([tmp_path], 1 << 40, 10).files <= 10 + 50  # at most one folder's listing past the limit


def test_a_folder_made_unreadable_is_opened_to_be_counted(tmp_path, monkeypatch):
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / "f").write_bytes(b"z" * 100)
    (tmp_path / "hidden").chmod(0)
    scandir, refused = os.scandir, []

    def as_its_owner(path):  # what a worker that is not root meets (root reads any folder)
        if Path(path).stat().st_mode & 0o700 == 0:
            refused.append(path)
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr("os.scandir", as_its_owner)

    assert measure([tmp_path], 1 << 40, 1 << 40).files == 2
    assert refused == [tmp_path / "hidden"] and (tmp_path / "hidden").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(("lines", "relative"), [
    ("12:pids:/docker/abc\n1:cpu:/docker/abc\n0::/docker/abc\n", "pids/docker/abc"),  # cgroup v1, cgroupfs
    ("0::/system.slice/docker-abc.scope\n", "system.slice/docker-abc.scope"),  # cgroup v2, systemd
])
def test_the_pids_counter_of_a_container_is_found_in_either_cgroup_layout(tmp_path, lines, relative):
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text(lines)
    (cgroup / relative).mkdir(parents=True)
    (cgroup / relative / "pids.events").write_text("max 17\n")

    events = pids_events_file(42, proc, cgroup)

    assert events == cgroup / relative / "pids.events" and forks_refused(events) == 17
    assert pids_events_file(43, proc, cgroup) is None
    assert forks_refused(tmp_path / "gone" / "pids.events") is None


class FakeContainer:
    id = "f" * 64
    attrs = {"State": {"Pid": 0}}

    def __init__(self) -> None:
        self.killed = threading.Event()

    def kill(self) -> None:
        self.killed.set()

    def stats(self, **_: object) -> dict:
        return {"pids_stats": {"current": 1, "limit": 32}}


def test_the_watch_kills_a_container_as_soon_as_its_output_is_over_the_limit(tmp_path):
    container = FakeContainer()
    with Watch(container, [tmp_path], max_bytes=1 << 20, max_files=100) as watch:
        assert not container.killed.is_set()
        (tmp_path / "big").write_bytes(b"x" * (2 << 20))
        assert container.killed.wait(30)
    assert watch.over == "bytes" and watch.refused_forks == 0


def test_the_watch_asks_the_engine_when_it_cannot_see_the_containers_cgroup(monkeypatch):
    monkeypatch.setattr("site_worker.watch.pids_events_file", lambda pid: None)
    container = FakeContainer()
    container.attrs = {"State": {"Pid": 4242}}
    container.stats = lambda **_: {"pids_stats": {"current": 32, "limit": 32}}

    with Watch(container, [], max_bytes=1, max_files=1) as watch:
        pass

    assert watch.refused_forks == 1 and watch.over is None and not container.killed.is_set()
