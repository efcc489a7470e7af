"""Dataset preparation at the site: run a benchmark's preparator on raw data, hash the result.

The content hash binds every result to the exact prepared data and labels it was computed on.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from site_worker.containers import (
    ContainerError,
    ContainerRunner,
    Limits,
    Mount,
    OutputRefused,
    RunSpec,
    read_output,
)

CHUNK = 1 << 20
STATISTICS_FILE = "statistics.json"
# A site prepares its own data with the benchmark's preparator, once, watching: hours, and as much as its cases take
PREPARE_LIMITS = Limits(timeout_s=6 * 3600.0, output_bytes=1 << 40, output_files=50_000_000)


@dataclass(frozen=True)
class PreparedDataset:
    data_dir: Path
    labels_dir: Path
    content_hash: str
    case_count: int
    statistics: dict[str, float]
    preparator_image: str


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path, prefix: str) -> Iterator[tuple[str, Path]]:
    for path in root.rglob("*"):
        if path.is_file():
            yield f"{prefix}/{path.relative_to(root).as_posix()}", path


def content_hash(data_dir: Path, labels_dir: Path) -> str:
    """sha256 over the sorted relative paths and file hashes of the data and labels trees."""
    entries = sorted([*_files(data_dir, "data"), *_files(labels_dir, "labels")])
    digest = hashlib.sha256()
    for name, path in entries:
        digest.update(f"{name}\0{_file_sha256(path)}\n".encode())
    return "sha256:" + digest.hexdigest()


def prepare_dataset(
    runner: ContainerRunner,
    preparator_image: str,
    raw_dir: Path,
    out_dir: Path,
    limits: Limits = PREPARE_LIMITS,
) -> PreparedDataset:
    """Run the preparator's `prepare`, `sanity_check` and `statistics` tasks into `out_dir`.

    `out_dir` gets `data/`, `labels/` and `out/statistics.json`; data and labels must start empty.
    """
    image = runner.image_id(preparator_image)
    if image is None:
        raise ContainerError(preparator_image, "prepare", "preparator image is not present locally")
    data_dir, labels_dir, stats_dir = out_dir / "data", out_dir / "labels", out_dir / "out"
    for directory in (data_dir, labels_dir, stats_dir):
        directory.mkdir(parents=True, exist_ok=True)
        if directory is not stats_dir and any(directory.iterdir()):
            raise FileExistsError(f"{directory} is not empty: prepare a dataset into a fresh directory")

    raw = Mount(raw_dir, "/assay/raw")
    data, labels = Mount(data_dir, "/assay/data"), Mount(labels_dir, "/assay/labels")
    out = Mount(stats_dir, "/assay/out", writable=True)
    steps = {
        "prepare": (raw, Mount(data_dir, data.target, writable=True),
                    Mount(labels_dir, labels.target, writable=True), out),
        "sanity_check": (raw, data, labels),
        "statistics": (data, labels, out),
    }
    for task, mounts in steps.items():
        outcome = runner.run(RunSpec(image=image, task=task, mounts=mounts, limits=limits))
        if not outcome.ok:
            reason = f"preparator step {task!r} failed ({outcome.why}); log tail:\n{outcome.log_tail}"
            raise ContainerError(image, task, reason)

    statistics = _read_statistics(stats_dir / STATISTICS_FILE, image)
    return PreparedDataset(
        data_dir=data_dir,
        labels_dir=labels_dir,
        content_hash=content_hash(data_dir, labels_dir),
        case_count=int(statistics["cases"]),
        statistics=statistics,
        preparator_image=image,
    )


def _read_statistics(path: Path, image: str) -> dict[str, float]:
    """Statistics leave the site: only a flat object of finite numbers, with a whole `cases` count."""
    def bad(reason: str) -> ContainerError:
        return ContainerError(image, "statistics", f"{path.name} {reason}")

    try:
        loaded = json.loads(read_output(path).decode("utf-8"))
    except OutputRefused as refused:
        raise bad(f"in /assay/out {refused}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad(f"is not valid JSON: {error}") from error
    if not isinstance(loaded, dict):
        raise bad("must hold a JSON object")
    for key, value in loaded.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad(f"field {key!r} must be a finite number, got {value!r}")
    cases = loaded.get("cases")
    if cases is None or cases != int(cases) or cases < 0:
        raise bad(f"field 'cases' must be a whole number of cases, got {cases!r}")
    return loaded
