"""The demo's data: the Wisconsin diagnostic breast cancer set (569 cases, ships with scikit-learn).

Split, deterministically: a stratified 30% "development" split (seed 2023) trains the demo
models and is held by no site. The other 398 cases go to three sites: a case with an even
index goes to the site of its tertile of `mean_radius` (site 0 the smallest tumours, like a
screening clinic; site 2 the largest, like a referral centre); a case with an odd index goes
to site `index % 3`, so every site still sees every kind of case. Result: site 0 141 cases,
19.1% malignant; site 1 133 cases, 27.1%; site 2 124 cases, 68.5%. Label 1 = malignant.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

SEED = 2023
DEVELOPMENT_FRACTION = 0.3
SITE_COUNT = 3

MODEL_FEATURES: dict[str, tuple[str, ...] | None] = {
    "reference": None,  # all 30 features
    "compact": ("mean_radius", "mean_compactness", "mean_concavity"),
    "texture": ("mean_texture", "texture_error", "mean_smoothness", "smoothness_error"),
}


@dataclass(frozen=True)
class Cases:
    case_ids: tuple[str, ...]
    features: np.ndarray  # (cases, features), columns named by feature_names
    labels: np.ndarray  # 1 = malignant
    feature_names: tuple[str, ...]

    def subset(self, rows: np.ndarray) -> Cases:
        return Cases(tuple(self.case_ids[i] for i in rows), self.features[rows], self.labels[rows], self.feature_names)


@dataclass(frozen=True)
class Split:
    development: tuple[int, ...]  # row indices into load_cases()
    sites: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class SiteSummary:
    index: int
    cases: int
    prevalence: float


@cache
def load_cases() -> Cases:
    bunch = load_breast_cancer()
    names = tuple(str(name).replace(" ", "_") for name in bunch.feature_names)
    labels = (bunch.target == 0).astype(np.int64)  # sklearn's target has 0 = malignant
    case_ids = tuple(f"wdbc-{i:04d}" for i in range(len(labels)))
    return Cases(case_ids, bunch.data.astype(np.float64), labels, names)


@cache
def split_cases() -> Split:
    cases = load_cases()
    rows = np.arange(len(cases.labels))
    rest, development = train_test_split(
        rows, test_size=DEVELOPMENT_FRACTION, stratify=cases.labels, random_state=SEED
    )
    rest = np.sort(rest)
    radius = cases.features[rest, cases.feature_names.index("mean_radius")]
    ranks = np.empty(len(rest), dtype=np.int64)
    ranks[np.argsort(radius, kind="stable")] = np.arange(len(rest))
    tertile = ranks * SITE_COUNT // len(rest)
    site = np.where(rest % 2 == 0, tertile, rest % SITE_COUNT)
    return Split(
        development=tuple(int(i) for i in np.sort(development)),
        sites=tuple(tuple(int(i) for i in rest[site == s]) for s in range(SITE_COUNT)),
    )


def site_cases(site_index: int) -> Cases:
    if not 0 <= site_index < SITE_COUNT:
        raise ValueError(f"site_index must be 0..{SITE_COUNT - 1}, got {site_index}")
    return load_cases().subset(np.array(split_cases().sites[site_index]))


def describe_sites() -> list[SiteSummary]:
    summaries = []
    for index in range(SITE_COUNT):
        labels = site_cases(index).labels
        summaries.append(SiteSummary(index, len(labels), float(labels.mean())))
    return summaries


def write_site_raw(site_index: int, directory: Path) -> Path:
    """Write `cases.csv` (case_id, the 30 features, diagnosis M/B) as the site holds it."""
    return _write_raw(site_cases(site_index), directory)


def _write_raw(cases: Cases, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "cases.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case_id", *cases.feature_names, "diagnosis"])
        for case_id, row, label in zip(cases.case_ids, cases.features, cases.labels):
            writer.writerow([case_id, *(repr(float(x)) for x in row), "M" if label == 1 else "B"])
    return path


def write_demo_raw(directory: Path, per_class: int = 10) -> int:
    """The benchmark's demo data: the first `per_class` malignant and benign cases of the development split (held by
    no site), as `cases.csv` in the sites' raw format; how many cases it holds."""
    cases = load_cases()
    development = np.array(split_cases().development)
    chosen = np.sort(np.concatenate([development[cases.labels[development] == label][:per_class] for label in (1, 0)]))
    demo = cases.subset(chosen)
    _write_raw(demo, directory)
    return len(demo.case_ids)


def train_models(directory: Path) -> dict[str, Path]:
    """Train the three demo models on the development split; write one weights JSON each."""
    cases = load_cases()
    development = cases.subset(np.array(split_cases().development))
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, features in MODEL_FEATURES.items():
        chosen = features or cases.feature_names
        columns = [cases.feature_names.index(f) for f in chosen]
        x = development.features[:, columns]
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(max_iter=1000).fit(scaler.transform(x), development.labels)
        weights = {
            "features": list(chosen),
            "mean": scaler.mean_.tolist(),
            "scale": scaler.scale_.tolist(),
            "coef": model.coef_[0].tolist(),
            "intercept": float(model.intercept_[0]),
        }
        path = directory / f"{name}.json"
        path.write_text(json.dumps(weights, indent=2) + "\n")
        written[name] = path
    return written
