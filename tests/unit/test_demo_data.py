"""The demo's data split and models, and the dataset content hash and preparation steps."""

import csv
import json
from pathlib import Path

import pytest

from assay.demo import data
from site_worker.containers import ContainerError, FakeRunner, RunOutcome, RunSpec
from site_worker.datasets import content_hash, prepare_dataset


def test_the_split_is_the_same_every_time():
    first, second = data.split_cases.__wrapped__(), data.split_cases.__wrapped__()

    assert first == second


def test_the_split_is_disjoint_and_covers_all_569_cases():
    split = data.split_cases()
    parts = [split.development, *split.sites]
    every = [row for part in parts for row in part]

    assert len(every) == len(set(every)) == 569
    assert set(every) == set(range(569))
    assert len(split.development) == round(0.3 * 569)


def test_the_development_split_keeps_the_overall_prevalence():
    cases = data.load_cases()
    development = cases.labels[list(data.split_cases().development)]

    assert abs(development.mean() - cases.labels.mean()) < 0.01


def test_label_one_means_malignant():
    assert int(data.load_cases().labels.sum()) == 212  # WDBC: 212 malignant, 357 benign


def test_the_sites_differ_in_prevalence():
    sites = data.describe_sites()
    prevalences = sorted(site.prevalence for site in sites)

    assert [site.cases for site in sites] == [141, 133, 124]
    assert prevalences[-1] - prevalences[0] > 0.3
    assert all(0.1 < p < 0.9 for p in prevalences)  # every site has both classes to evaluate on


def test_a_site_raw_file_holds_its_cases_with_m_and_b_diagnoses(tmp_path):
    path = data.write_site_raw(1, tmp_path)

    with path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    expected = data.site_cases(1)
    assert [row["case_id"] for row in rows] == list(expected.case_ids)
    assert list(rows[0]) == ["case_id", *expected.feature_names, "diagnosis"]
    assert len(expected.feature_names) == 30 and "mean_concave_points" in expected.feature_names
    assert [row["diagnosis"] == "M" for row in rows] == [bool(y) for y in expected.labels]


def test_the_three_models_are_trained_and_written_the_same_way_every_time(tmp_path):
    first = data.train_models(tmp_path / "a")
    second = data.train_models(tmp_path / "b")

    assert set(first) == {"reference", "compact", "texture"}
    for name, path in first.items():
        weights = json.loads(path.read_text())
        n = len(weights["features"])
        assert len(weights["mean"]) == len(weights["scale"]) == len(weights["coef"]) == n
        assert isinstance(weights["intercept"], float)
        assert path.read_bytes() == second[name].read_bytes()
    assert len(json.loads(first["reference"].read_text())["features"]) == 30
    assert 3 <= len(json.loads(first["compact"].read_text())["features"]) <= 5


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)


DATA = {"features.csv": b"case_id,x\n1,0.5\n2,0.7\n", "images/a.bin": b"\x00\x01"}
LABELS = {"labels.csv": b"case_id,label\n1,0\n2,1\n"}


def test_the_content_hash_ignores_the_order_files_were_written_in(tmp_path):
    write_tree(tmp_path / "one" / "data", DATA)
    write_tree(tmp_path / "one" / "labels", LABELS)
    write_tree(tmp_path / "two" / "data", dict(reversed(DATA.items())))
    write_tree(tmp_path / "two" / "labels", LABELS)

    one = content_hash(tmp_path / "one" / "data", tmp_path / "one" / "labels")
    two = content_hash(tmp_path / "two" / "data", tmp_path / "two" / "labels")

    assert one == two
    assert one.startswith("sha256:") and len(one) == len("sha256:") + 64


def test_the_content_hash_changes_when_one_byte_of_a_label_changes(tmp_path):
    write_tree(tmp_path / "data", DATA)
    write_tree(tmp_path / "labels", LABELS)
    before = content_hash(tmp_path / "data", tmp_path / "labels")

    write_tree(tmp_path / "labels", {"labels.csv": LABELS["labels.csv"].replace(b"2,1", b"2,0")})

    assert content_hash(tmp_path / "data", tmp_path / "labels") != before


def test_the_content_hash_tells_data_from_labels(tmp_path):
    write_tree(tmp_path / "a" / "data", {"x.csv": b"1"})
    (tmp_path / "a" / "labels").mkdir()
    (tmp_path / "b" / "data").mkdir(parents=True)
    write_tree(tmp_path / "b" / "labels", {"x.csv": b"1"})

    assert content_hash(tmp_path / "a" / "data", tmp_path / "a" / "labels") != content_hash(
        tmp_path / "b" / "data", tmp_path / "b" / "labels"
    )


def fake_preparator(statistics: dict) -> tuple[FakeRunner, str]:
    runner = FakeRunner()
    image = runner.add_image("assay-demo/preparator:1")

    def prepare(spec: RunSpec) -> None:
        write_tree(spec.source_of("/assay/data"), DATA)
        write_tree(spec.source_of("/assay/labels"), LABELS)

    def statistics_task(spec: RunSpec) -> None:
        (spec.source_of("/assay/out") / "statistics.json").write_text(json.dumps(statistics))

    runner.on("prepare", prepare)
    runner.on("statistics", statistics_task)
    return runner, image


def test_preparing_runs_the_three_steps_with_the_contract_mounts(tmp_path):
    runner, image = fake_preparator({"cases": 2, "prevalence": 0.5})

    prepared = prepare_dataset(runner, "assay-demo/preparator:1", tmp_path / "raw", tmp_path / "site")

    assert [s.task for s in runner.specs] == ["prepare", "sanity_check", "statistics"]
    assert all(s.image == image for s in runner.specs)
    writable = [{m.target for m in s.mounts if m.writable} for s in runner.specs]
    assert writable == [{"/assay/data", "/assay/labels", "/assay/out"}, set(), {"/assay/out"}]
    assert "/assay/raw" not in {m.target for m in runner.specs[2].mounts}
    assert (prepared.case_count, prepared.statistics["prevalence"]) == (2, 0.5)
    assert prepared.content_hash == content_hash(tmp_path / "site" / "data", tmp_path / "site" / "labels")


def test_a_failing_step_is_named_with_the_image_and_the_log_tail(tmp_path):
    runner, image = fake_preparator({"cases": 2})
    runner.script("sanity_check", RunOutcome(exit_code=1, log_tail="labels.csv line 3: label '7' is not 0 or 1"))

    with pytest.raises(ContainerError) as failed:
        prepare_dataset(runner, image, tmp_path / "raw", tmp_path / "site")

    message = str(failed.value)
    assert "sanity_check" in message and image in message and "label '7'" in message
    assert [s.task for s in runner.specs] == ["prepare", "sanity_check"]


@pytest.mark.parametrize("statistics", [{"prevalence": 0.5}, {"cases": 2, "ids": ["1", "2"]}, {"cases": 2.5}])
def test_statistics_that_are_not_a_flat_set_of_numbers_with_a_case_count_are_refused(tmp_path, statistics):
    runner, image = fake_preparator(statistics)

    with pytest.raises(ContainerError, match="statistics"):
        prepare_dataset(runner, image, tmp_path / "raw", tmp_path / "site")


def test_an_absent_preparator_image_is_refused_before_anything_runs(tmp_path):
    runner = FakeRunner()

    with pytest.raises(ContainerError, match="not present"):
        prepare_dataset(runner, "assay-demo/preparator:1", tmp_path / "raw", tmp_path / "site")
    assert runner.specs == []
