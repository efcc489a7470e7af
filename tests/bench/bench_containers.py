"""What the site worker's sandboxed execution path costs over bare `docker run` of the same two containers.

One trivial image (FROM the Python base) answers `infer` and `evaluate` with minimal valid outputs. Each repetition
runs it through `site_worker.execution.execute` with the real `DockerRunner`, and bare, both through the docker CLI
and through the docker SDK's `containers.run(remove=True)`; the variants are interleaved, the order rotating.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker

from contracts.messages import JobBinding, JobSpec, MetricSpec
from site_worker.containers import DockerRunner, Limits
from site_worker.datasets import content_hash
from site_worker.execution import execute

BASE_IMAGE = "assay/python-base:bookworm"
TAG = "assay-bench/trivial:1"

DOCKERFILE = f"""FROM {BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1
COPY main.py /app/main.py
RUN mkdir -p /assay/out && chmod 1777 /assay/out
USER 65534:65534
ENTRYPOINT ["python3", "/app/main.py"]
"""

ENTRYPOINT = '''"""The smallest model and evaluator that honour the container contract."""
import json
import sys

task = sys.argv[1]
if task == "infer":
    with open("/assay/out/predictions.jsonl", "w") as f:
        f.write(json.dumps({"case": 0, "score": 0.5}) + "\\n")
elif task == "evaluate":
    with open("/assay/out/metrics.json", "w") as f:
        json.dump({"metrics": {"auc": 0.5}}, f)
    with open("/assay/out/cases.jsonl", "w") as f:
        f.write(json.dumps({"case": 0, "correct": 1}) + "\\n")
else:
    sys.exit(f"unknown task {task}")
'''


def build_image(client: docker.DockerClient, context: Path) -> str:
    context.mkdir(parents=True, exist_ok=True)
    (context / "Dockerfile").write_text(DOCKERFILE)
    (context / "main.py").write_text(ENTRYPOINT)
    image, _ = client.images.build(path=str(context), tag=TAG, network_mode="none", rm=True, forcerm=True)
    return str(image.id)


def trivial_job(image: str, dataset: Path) -> JobSpec:
    data, labels = dataset / "data", dataset / "labels"
    data.mkdir(parents=True)
    labels.mkdir(parents=True)
    (data / "case-0.json").write_text('{"x": 1}')
    (labels / "case-0.json").write_text('{"y": 1}')
    binding = JobBinding(benchmark_id="bench", model_id="trivial", dataset_id="ds", model_image=image,
                         evaluator_image=image, dataset_hash=content_hash(data, labels), case_count=1)
    return JobSpec(job_id="job-bench-containers", site_id="site", binding=binding, metrics=(MetricSpec(name="auc"),),
                   expires_at=datetime(2100, 1, 1, tzinfo=UTC))


def paired_ratio(values: list[float], baseline: list[float]) -> float:
    return statistics.median([v / b for v, b in zip(values, baseline, strict=True)])


def measure(repetitions: int, log: Callable[[str], None]) -> dict[str, Any]:
    client = docker.from_env()
    with tempfile.TemporaryDirectory(prefix="assay-bench-containers-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        image = build_image(client, root / "image")
        build_s = time.perf_counter() - start
        job = trivial_job(image, root / "dataset")
        runner = DockerRunner(client)

        def sandboxed() -> None:
            metrics = execute(job, root / "dataset", runner, root / "work", Limits())
            assert metrics.leaving == {"auc": 0.5}, metrics

        def bare_cli() -> None:
            for task in ("infer", "evaluate"):
                subprocess.run(["docker", "run", "--rm", "--network", "none", image, task], check=True,
                               stdout=subprocess.DEVNULL)

        def bare_sdk() -> None:
            for task in ("infer", "evaluate"):
                client.containers.run(image, [task], network_mode="none", remove=True)

        variants = {"execute": sandboxed, "docker_cli": bare_cli, "docker_sdk": bare_sdk}
        for run in variants.values():  # warm-up: page cache, first-container costs
            run()
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for rep in range(repetitions):
            for name in names[rep % 3:] + names[:rep % 3]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        client.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "repetitions": repetitions, "image_build_s": build_s,
        "median_s": medians, "all_s": {n: [round(v, 3) for v in values] for n, values in times.items()},
        "ratio_execute_to_cli": medians["execute"] / medians["docker_cli"],
        "ratio_execute_to_sdk": medians["execute"] / medians["docker_sdk"],
        # the same repetition's runs are seconds apart: their ratio shrugs off load that drifts during the run
        "paired_ratio_execute_to_cli": paired_ratio(times["execute"], times["docker_cli"]),
        "paired_ratio_execute_to_sdk": paired_ratio(times["execute"], times["docker_sdk"]),
    }
    log(f"containers: execute {medians['execute']:.2f} s, docker run {medians['docker_cli']:.2f} s, "
        f"SDK run {medians['docker_sdk']:.2f} s (medians of {repetitions})")
    return result
