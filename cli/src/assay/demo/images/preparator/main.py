"""Demo preparator: turns a site's raw cases.csv into features, labels and aggregate statistics.

Tasks (the Assay container contract): prepare, sanity_check, statistics. Standard library only.
"""

import csv
import json
import math
import sys
from pathlib import Path

RAW = Path("/assay/raw/cases.csv")
FEATURES = Path("/assay/data/features.csv")
LABELS = Path("/assay/labels/labels.csv")
STATISTICS = Path("/assay/out/statistics.json")
DIAGNOSIS = {"M": 1, "B": 0}  # label 1 = malignant
SUMMARISED = ("mean_radius", "mean_texture", "mean_area", "mean_smoothness")


class BadInput(Exception):
    """The input is not what this preparator accepts; the message says where and why."""


def read_table(path):
    if not path.is_file():
        raise BadInput(f"{path} is missing")
    with path.open(newline="") as stream:
        rows = list(csv.reader(stream))
    if not rows:
        raise BadInput(f"{path} is empty")
    header, body = rows[0], rows[1:]
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise BadInput(f"{path} line {line}: {len(row)} fields, the header has {len(header)}")
    return header, body


def column(header, name, path):
    if name not in header:
        raise BadInput(f"{path} has no {name!r} column")
    return header.index(name)


def number(text, where):
    try:
        value = float(text)
    except ValueError:
        raise BadInput(f"{where}: {text!r} is not a number (missing value?)") from None
    if not math.isfinite(value):
        raise BadInput(f"{where}: missing value ({text!r})")
    return value


def check_ids(ids, path):
    seen = set()
    for case_id in ids:
        if not case_id.strip():
            raise BadInput(f"{path}: a case has an empty case_id")
        if case_id in seen:
            raise BadInput(f"{path}: case_id {case_id!r} appears twice")
        seen.add(case_id)
    if not seen:
        raise BadInput(f"{path} holds no cases")


def prepare():
    header, rows = read_table(RAW)
    id_col, dx_col = column(header, "case_id", RAW), column(header, "diagnosis", RAW)
    feature_cols = [i for i in range(len(header)) if i not in (id_col, dx_col)]
    if not feature_cols:
        raise BadInput(f"{RAW} has no feature columns")
    check_ids([row[id_col] for row in rows], RAW)
    features, labels = [], []
    for line, row in enumerate(rows, start=2):
        diagnosis = row[dx_col].strip().upper()
        if diagnosis not in DIAGNOSIS:
            raise BadInput(f"{RAW} line {line}: diagnosis {row[dx_col]!r} is not M or B")
        values = [number(row[i], f"{RAW} line {line}, {header[i]}") for i in feature_cols]
        features.append([row[id_col], *(repr(v) for v in values)])
        labels.append([row[id_col], DIAGNOSIS[diagnosis]])
    with FEATURES.open("w", newline="") as stream:
        csv.writer(stream).writerows([["case_id", *(header[i] for i in feature_cols)], *features])
    with LABELS.open("w", newline="") as stream:
        csv.writer(stream).writerows([["case_id", "label"], *labels])
    print(f"prepared {len(rows)} cases with {len(feature_cols)} features")


def sanity_check():
    raw_header, raw_rows = read_table(RAW)
    f_header, f_rows = read_table(FEATURES)
    l_header, l_rows = read_table(LABELS)
    if f_header[0] != "case_id" or l_header != ["case_id", "label"]:
        raise BadInput("features.csv must start with case_id; labels.csv must be case_id,label")
    feature_ids, label_ids = [r[0] for r in f_rows], [r[0] for r in l_rows]
    check_ids(feature_ids, FEATURES)
    if feature_ids != label_ids:
        raise BadInput("case ids in features.csv and labels.csv differ")
    raw_ids = [r[column(raw_header, "case_id", RAW)] for r in raw_rows]
    if sorted(feature_ids) != sorted(raw_ids):
        raise BadInput("prepared case ids do not match the raw cases")
    for line, row in enumerate(f_rows, start=2):
        for name, text in zip(f_header[1:], row[1:]):
            number(text, f"{FEATURES} line {line}, {name}")
    for line, row in enumerate(l_rows, start=2):
        if row[1] not in ("0", "1"):
            raise BadInput(f"{LABELS} line {line}: label {row[1]!r} is not 0 or 1")
    print(f"sanity check passed: {len(f_rows)} cases, {len(f_header) - 1} features")


def statistics():
    f_header, f_rows = read_table(FEATURES)
    _, l_rows = read_table(LABELS)
    labels = [int(row[1]) for row in l_rows]
    if not labels:
        raise BadInput(f"{LABELS} holds no cases")
    stats = {"cases": len(labels), "prevalence": sum(labels) / len(labels), "features": len(f_header) - 1}
    for name in SUMMARISED:  # aggregates only: nothing about a single case leaves the site
        if name in f_header:
            i = f_header.index(name)
            stats[f"avg_{name}"] = round(sum(float(row[i]) for row in f_rows) / len(f_rows), 6)
    STATISTICS.write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    print(f"statistics written for {len(labels)} cases")


TASKS = {"prepare": prepare, "sanity_check": sanity_check, "statistics": statistics}


def main(argv):
    task = argv[1] if len(argv) > 1 else None
    if task not in TASKS:
        print(f"unknown task {task!r}; this preparator runs one of: {', '.join(TASKS)}", file=sys.stderr)
        return 2
    try:
        TASKS[task]()
    except BadInput as error:
        print(f"{task} failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
