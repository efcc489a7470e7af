"""Demo evaluator: AUC, sensitivity and specificity (at score >= 0.5) of a model's predictions.

Task (the Assay container contract): evaluate. Writes /assay/out/metrics.json and cases.jsonl.
"""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

PREDICTIONS = Path("/assay/predictions/predictions.csv")
LABELS = Path("/assay/labels/labels.csv")
METRICS = Path("/assay/out/metrics.json")
CASES = Path("/assay/out/cases.jsonl")
THRESHOLD = 0.5


class BadInput(Exception):
    """The input is not what this evaluator accepts; the message says where and why."""


def read_pairs(path, value_column, parse):
    """{case_id: parse(value)} from a two-column csv with header case_id,<value_column>."""
    if not path.is_file():
        raise BadInput(f"{path} is missing")
    with path.open(newline="") as stream:
        rows = list(csv.reader(stream))
    if not rows or rows[0] != ["case_id", value_column]:
        raise BadInput(f"{path} must have the header case_id,{value_column}")
    pairs = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise BadInput(f"{path} line {line}: expected 2 fields, got {len(row)}")
        if row[0] in pairs:
            raise BadInput(f"{path} line {line}: case_id {row[0]!r} appears twice")
        try:
            pairs[row[0]] = parse(row[1])
        except ValueError as error:
            raise BadInput(f"{path} line {line}: {error}") from None
    return pairs


def score(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"score {text!r} is not a finite number")
    return value


def label(text):
    if text not in ("0", "1"):
        raise ValueError(f"label {text!r} is not 0 or 1")
    return int(text)


def average_ranks(values):
    """1-based ranks, tied values sharing the average of their ranks."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auc(labels, scores):
    """The Mann-Whitney U statistic over positives and negatives, normalised to [0, 1]."""
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    if positives == 0 or negatives == 0:
        raise BadInput("AUC needs at least one malignant and one benign case")
    rank_sum = average_ranks(scores)[labels == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def evaluate():
    predictions = read_pairs(PREDICTIONS, "score", score)
    truth = read_pairs(LABELS, "label", label)
    if predictions.keys() != truth.keys():
        missing, extra = truth.keys() - predictions.keys(), predictions.keys() - truth.keys()
        raise BadInput(
            f"case ids differ: {len(missing)} cases without a prediction, "
            f"{len(extra)} predictions for unknown cases"
        )
    ids = sorted(truth)
    labels = np.array([truth[i] for i in ids], dtype=np.int64)
    scores = np.array([predictions[i] for i in ids], dtype=np.float64)
    predicted = (scores >= THRESHOLD).astype(np.int64)
    metrics = {
        "auc": auc(labels, scores),
        "sensitivity": float((predicted[labels == 1] == 1).mean()),
        "specificity": float((predicted[labels == 0] == 0).mean()),
    }
    METRICS.write_text(json.dumps({"metrics": metrics}, indent=2) + "\n")
    with CASES.open("w") as stream:
        for case_id, y, s, p in zip(ids, labels, scores, predicted):
            case = {"case_id": case_id, "label": int(y), "score": float(s), "predicted": int(p)}
            stream.write(json.dumps(case) + "\n")
    print(f"evaluated {len(ids)} cases: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def main(argv):
    task = argv[1] if len(argv) > 1 else None
    if task != "evaluate":
        print(f"unknown task {task!r}; this evaluator runs: evaluate", file=sys.stderr)
        return 2
    try:
        evaluate()
    except BadInput as error:
        print(f"evaluate failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
