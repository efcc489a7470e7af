"""The demo images and the sandbox on a real Docker engine.

A site's whole run (prepare, infer, evaluate) checked against scikit-learn, then what a
sandboxed container must not be able to do.
"""

import csv
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException
from sklearn.metrics import recall_score, roc_auc_score

from assay.demo import data
from assay.demo.build import BASE_IMAGE, DemoImages, build_demo_images, ensure_base_image
from site_worker.containers import ContainerError, DockerRunner, Limits, Mount, RunOutcome, RunSpec
from site_worker.datasets import PreparedDataset, content_hash, prepare_dataset

pytestmark = pytest.mark.docker

SITES = range(data.SITE_COUNT)
MODELS = tuple(data.MODEL_FEATURES)

PROBE = '''
import os, socket, sys, threading, time
task = sys.argv[1]
if task == "whoami":
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    caps, no_new_privs = status["CapEff"].strip(), status["NoNewPrivs"].strip()
    print(f"uid={os.getuid()} gid={os.getgid()} CapEff={caps} NoNewPrivs={no_new_privs}")
elif task == "network":
    print("interfaces", sorted(os.listdir("/sys/class/net")))
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=5)
    except OSError as error:
        print("no connection:", error)
        sys.exit(3)
    print("connected")
elif task == "write":
    try:
        with open(os.environ["PROBE_PATH"], "w") as stream:
            stream.write("written from inside")
    except OSError as error:
        print("cannot write:", error)
        sys.exit(3)
elif task == "spread":  # what a careless (or hostile) container leaves: open modes, a link out
    os.umask(0)
    os.makedirs("/assay/out/open/deeper", mode=0o777)
    with open("/assay/out/open/deeper/scores.csv", "w") as stream:
        stream.write("case_id,score")
    os.chmod("/assay/out/open/deeper/scores.csv", 0o666)
    os.symlink("/etc/passwd", "/assay/out/link")
elif task == "threads":
    stop, started = threading.Event(), 0
    try:
        while started < 10_000:
            threading.Thread(target=stop.wait, daemon=True).start()
            started += 1
    except RuntimeError as error:
        print("refused:", error)
    print(f"threads={started}")
    stop.set()
elif task == "memory":
    hoard = [bytearray(64 << 20) for _ in range(64)]
elif task == "sleep":
    time.sleep(3600)
'''


@pytest.fixture(scope="module")
def client():
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as error:
        pytest.skip(f"no Docker engine: {error}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def runner(client) -> DockerRunner:
    return DockerRunner(client)


@pytest.fixture(scope="module")
def images(client, tmp_path_factory) -> DemoImages:
    return build_demo_images(client, tmp_path_factory.mktemp("demo-build"))


@pytest.fixture(scope="module")
def prepared(runner, images, tmp_path_factory) -> dict[int, PreparedDataset]:
    sites = {}
    for site in SITES:
        root = tmp_path_factory.mktemp(f"site-{site}")
        data.write_site_raw(site, root / "raw")
        sites[site] = prepare_dataset(runner, images.preparator, root / "raw", root / "prepared")
    return sites


@dataclass(frozen=True)
class Evaluated:
    predictions: Path
    results: Path
    infer: RunSpec
    metrics: dict[str, float]


def run_job(runner: DockerRunner, images: DemoImages, dataset: PreparedDataset, model: str, workdir: Path) -> Evaluated:
    """What a site worker does for one job: the model sees the data only, the evaluator the labels."""
    predictions, results = workdir / "predictions", workdir / "results"
    predictions.mkdir(parents=True)
    results.mkdir()
    env = {"ASSAY_JOB_ID": f"job-{workdir.name}"}
    infer = RunSpec(
        image=images.models[model], task="infer", env=env,
        mounts=(Mount(dataset.data_dir, "/assay/data"), Mount(predictions, "/assay/out", writable=True)),
    )
    outcome = runner.run(infer)
    assert outcome.ok, outcome.log_tail
    evaluate = RunSpec(
        image=images.evaluator, task="evaluate", env=env,
        mounts=(
            Mount(predictions, "/assay/predictions"),
            Mount(dataset.labels_dir, "/assay/labels"),
            Mount(results, "/assay/out", writable=True),
        ),
    )
    outcome = runner.run(evaluate)
    assert outcome.ok, outcome.log_tail
    metrics = json.loads((results / "metrics.json").read_text())["metrics"]
    return Evaluated(predictions, results, infer, metrics)


@pytest.fixture(scope="module")
def evaluated(runner, images, prepared, tmp_path_factory) -> dict[tuple[int, str], Evaluated]:
    return {
        (site, model): run_job(runner, images, prepared[site], model, tmp_path_factory.mktemp(f"job-{site}-{model}"))
        for site in SITES
        for model in MODELS
    }


def read_column(path: Path, name: str) -> dict[str, str]:
    with path.open(newline="") as stream:
        return {row["case_id"]: row[name] for row in csv.DictReader(stream)}


def test_a_site_prepares_its_raw_cases_into_features_labels_and_statistics(prepared):
    dataset, expected = prepared[0], data.site_cases(0)

    assert dataset.case_count == len(expected.labels)
    assert dataset.statistics["prevalence"] == pytest.approx(expected.labels.mean())
    labels = read_column(dataset.labels_dir / "labels.csv", "label")
    assert labels == {i: str(y) for i, y in zip(expected.case_ids, expected.labels)}
    with (dataset.data_dir / "features.csv").open() as stream:
        header = stream.readline().strip().split(",")
    assert header == ["case_id", *expected.feature_names]
    assert dataset.content_hash == content_hash(dataset.data_dir, dataset.labels_dir)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("model", MODELS)
def test_the_evaluator_metrics_match_scikit_learn(evaluated, prepared, site, model):
    job = evaluated[(site, model)]
    scores = {k: float(v) for k, v in read_column(job.predictions / "predictions.csv", "score").items()}
    labels = {k: int(v) for k, v in read_column(prepared[site].labels_dir / "labels.csv", "label").items()}
    ids = sorted(labels)
    y, s = [labels[i] for i in ids], [scores[i] for i in ids]
    predicted = [int(v >= 0.5) for v in s]

    assert job.metrics["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert job.metrics["sensitivity"] == pytest.approx(recall_score(y, predicted))
    assert job.metrics["specificity"] == pytest.approx(recall_score(y, predicted, pos_label=0))
    per_case = [json.loads(line) for line in (job.results / "cases.jsonl").read_text().splitlines()]
    assert len(per_case) == prepared[site].case_count
    print(f"site {site} {model}: " + " ".join(f"{k}={v:.3f}" for k, v in job.metrics.items()))


def test_the_model_sees_the_data_read_only_and_never_the_labels(evaluated):
    for job in evaluated.values():
        mounts = {m.target: m for m in job.infer.mounts}
        assert set(mounts) == {"/assay/data", "/assay/out"} and not mounts["/assay/data"].writable


def test_the_leaderboard_has_a_real_spread(evaluated):
    for site in SITES:
        auc = {model: evaluated[(site, model)].metrics["auc"] for model in MODELS}
        assert auc["reference"] > auc["texture"] + 0.05 and auc["compact"] > auc["texture"]


def test_the_evaluator_fails_clearly_when_case_ids_do_not_match(runner, images, evaluated, prepared, tmp_path):
    job = evaluated[(0, "reference")]
    (tmp_path / "predictions").mkdir()
    (tmp_path / "out").mkdir()
    lines = (job.predictions / "predictions.csv").read_text().splitlines()
    (tmp_path / "predictions" / "predictions.csv").write_text("\n".join(lines[:-1]) + "\n")

    outcome = runner.run(RunSpec(images.evaluator, "evaluate", (
        Mount(tmp_path / "predictions", "/assay/predictions"),
        Mount(prepared[0].labels_dir, "/assay/labels"),
        Mount(tmp_path / "out", "/assay/out", writable=True),
    )))

    assert outcome.exit_code == 1 and "1 cases without a prediction" in outcome.log_tail
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["preparator", "evaluator", "model"])
def test_a_demo_image_refuses_an_unknown_task(runner, images, kind):
    image = images.models["reference"] if kind == "model" else getattr(images, kind)

    outcome = runner.run(RunSpec(image, "train", ()))

    assert outcome.exit_code == 2 and "unknown task 'train'" in outcome.log_tail


@pytest.fixture(scope="module")
def probe(client, tmp_path_factory) -> str:
    """An image that runs as root unless told otherwise, and tries what a container must not do."""
    ensure_base_image(client)
    context = tmp_path_factory.mktemp("probe")
    (context / "probe.py").write_text(textwrap.dedent(PROBE))
    (context / "Dockerfile").write_text(
        f'FROM {BASE_IMAGE}\nCOPY probe.py /probe.py\nENTRYPOINT ["python3", "/probe.py"]\n'
    )
    image, _ = client.images.build(path=str(context), tag="assay-test/probe:1", network_mode="none", rm=True)
    return image.id


def probe_run(
    runner: DockerRunner, probe: str, task: str, *mounts: Mount, limits: Limits = Limits(), **env: str
) -> RunOutcome:
    return runner.run(RunSpec(probe, task, mounts, env=env, limits=limits))


def test_a_container_has_no_network(runner, probe):
    outcome = probe_run(runner, probe, "network")

    assert outcome.exit_code == 3, outcome.log_tail
    assert "interfaces ['lo']" in outcome.log_tail and "unreachable" in outcome.log_tail


def test_a_container_runs_as_nobody_with_no_capabilities(runner, probe):
    outcome = probe_run(runner, probe, "whoami")

    assert outcome.ok, outcome.log_tail
    assert "uid=65534 gid=65534 CapEff=0000000000000000 NoNewPrivs=1" in outcome.log_tail


def test_a_container_cannot_write_to_its_data_or_its_root_file_system(runner, probe, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_mount = Mount(data_dir, "/assay/data")

    to_data = probe_run(runner, probe, "write", data_mount, PROBE_PATH="/assay/data/new.csv")
    to_root = probe_run(runner, probe, "write", data_mount, PROBE_PATH="/etc/new.conf")
    to_tmp = probe_run(runner, probe, "write", data_mount, PROBE_PATH="/tmp/scratch")

    assert to_data.exit_code == 3 and "Read-only file system" in to_data.log_tail
    assert to_root.exit_code == 3 and "Read-only file system" in to_root.log_tail
    assert to_tmp.ok, to_tmp.log_tail
    assert list(data_dir.iterdir()) == []


def test_a_container_writes_its_writable_mount_as_the_sandbox_user(runner, probe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    outcome = probe_run(runner, probe, "write", Mount(out, "/assay/out", writable=True), PROBE_PATH="/assay/out/result")

    assert outcome.ok, outcome.log_tail
    assert (out / "result").read_text() == "written from inside"
    assert ((out / "result").stat().st_uid, (out / "result").stat().st_gid) == (65534, 65534)


def test_what_a_container_wrote_is_readable_by_its_owner_only_whatever_modes_it_gave(runner, probe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    outcome = probe_run(runner, probe, "spread", Mount(out, "/assay/out", writable=True))

    assert outcome.ok, outcome.log_tail
    modes = {str(p.relative_to(out)): p.lstat().st_mode & 0o777 for p in out.rglob("*") if not p.is_symlink()}
    assert modes == {"open": 0o700, "open/deeper": 0o700, "open/deeper/scores.csv": 0o600}
    assert out.stat().st_mode & 0o777 == 0o700
    assert (out / "link").is_symlink() and Path("/etc/passwd").stat().st_mode & 0o777 == 0o644  # not followed


def test_a_container_cannot_start_more_processes_than_its_pids_limit(runner, probe):
    outcome = probe_run(runner, probe, "threads", limits=Limits(pids=32))

    assert outcome.ok, outcome.log_tail
    started = int(outcome.log_tail.split("threads=")[1].split()[0])
    assert started < 32


def test_a_container_over_its_memory_limit_is_oom_killed(runner, probe):
    outcome = probe_run(runner, probe, "memory", limits=Limits(memory="128m"))

    assert outcome.oom_killed and not outcome.ok


def test_a_container_that_runs_past_its_timeout_is_killed_and_removed(client, probe):
    runner = DockerRunner(client, worker="timeout-test/worker-1")  # its own label: other tests run probes meanwhile
    outcome = probe_run(runner, probe, "sleep", limits=Limits(timeout_s=1))

    assert outcome.timed_out and not outcome.ok
    assert client.containers.list(all=True, filters={"label": "assay.worker=timeout-test/worker-1"}) == []


def test_an_image_given_by_tag_or_absent_is_refused(runner, images):
    with pytest.raises(ContainerError, match="never by tag"):
        runner.run(RunSpec("assay-demo/evaluator:1", "evaluate", ()))
    with pytest.raises(ContainerError, match="not present"):
        runner.run(RunSpec("sha256:" + "0" * 64, "evaluate", ()))


def test_a_container_that_fails_to_start_is_reported_and_removed(client, runner, tmp_path):
    ensure_base_image(client)
    (tmp_path / "Dockerfile").write_text(f'FROM {BASE_IMAGE}\nENTRYPOINT ["/no/such/program"]\n')
    broken, _ = client.images.build(path=str(tmp_path), tag="assay-test/broken:1", network_mode="none", rm=True)

    with pytest.raises(ContainerError, match="engine refused") as refused:
        runner.run(RunSpec(broken.id, "infer", ()))

    assert broken.id in str(refused.value) and "infer" in str(refused.value)
    assert client.containers.list(all=True, filters={"ancestor": broken.id}) == []


def test_a_restarted_worker_removes_the_containers_its_killed_run_left_running(client, probe):
    mine = client.containers.run(probe, ["sleep"], detach=True, network_mode="none",
                                 labels={"assay.worker": "site-a/worker-1"})
    another = client.containers.run(probe, ["sleep"], detach=True, network_mode="none",
                                    labels={"assay.worker": "site-a/worker-2"})  # the same site's other worker
    try:
        removed = DockerRunner(client, worker="site-a/worker-1").remove_leftovers()

        assert removed == [mine.id]
        with pytest.raises(docker.errors.NotFound):
            mine.reload()
        another.reload()
        assert another.status == "running"
    finally:
        for container in (mine, another):
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass
