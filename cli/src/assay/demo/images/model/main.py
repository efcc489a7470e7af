"""Demo model: a standardised logistic regression whose weights are baked into the image.

Task (the Assay container contract): infer. Reads /assay/data, writes /assay/out/predictions.csv.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np

WEIGHTS = Path("/app/weights.json")
FEATURES = Path("/assay/data/features.csv")
PREDICTIONS = Path("/assay/out/predictions.csv")


class BadInput(Exception):
    """The input is not what this model accepts; the message says where and why."""


def load_weights():
    try:
        weights = json.loads(WEIGHTS.read_text())
        names = list(weights["features"])
        arrays = [np.asarray(weights[key], dtype=np.float64) for key in ("mean", "scale", "coef")]
        intercept = float(weights["intercept"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"{WEIGHTS} is unusable: {error!r}") from None
    if any(a.shape != (len(names),) for a in arrays):
        raise BadInput(f"{WEIGHTS}: mean, scale and coef must each have one value per feature")
    return names, *arrays, intercept


def read_features(names):
    if not FEATURES.is_file():
        raise BadInput(f"{FEATURES} is missing")
    with FEATURES.open(newline="") as stream:
        rows = list(csv.reader(stream))
    if not rows or rows[0][:1] != ["case_id"]:
        raise BadInput(f"{FEATURES} must have a header starting with case_id")
    header, body = rows[0], rows[1:]
    missing = [name for name in names if name not in header]
    if missing:
        raise BadInput(f"{FEATURES} lacks the features this model needs: {', '.join(missing)}")
    columns = [header.index(name) for name in names]
    ids, values = [], []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise BadInput(f"{FEATURES} line {line}: {len(row)} fields, the header has {len(header)}")
        try:
            values.append([float(row[i]) for i in columns])
        except ValueError:
            raise BadInput(f"{FEATURES} line {line}: a feature value is not a number") from None
        ids.append(row[0])
    x = np.asarray(values, dtype=np.float64).reshape(len(ids), len(names))
    if not np.isfinite(x).all():
        raise BadInput(f"{FEATURES} has missing values")
    return ids, x


def infer():
    names, mean, scale, coef, intercept = load_weights()
    ids, x = read_features(names)
    scores = 1.0 / (1.0 + np.exp(-(((x - mean) / scale) @ coef + intercept)))
    with PREDICTIONS.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case_id", "score"])
        writer.writerows([case_id, repr(float(score))] for case_id, score in zip(ids, scores))
    print(f"scored {len(ids)} cases")


def main(argv):
    task = argv[1] if len(argv) > 1 else None
    if task != "infer":
        print(f"unknown task {task!r}; this model runs: infer", file=sys.stderr)
        return 2
    try:
        infer()
    except BadInput as error:
        print(f"infer failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
