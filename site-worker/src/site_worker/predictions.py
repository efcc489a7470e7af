"""The declared prediction format, checked at the site between the model and the evaluator: one CSV table with
exactly the declared columns, one row per registered case, each value a finite number. Only that file reaches the
evaluator; whatever else the model wrote (junk, a copy of its input) stays behind and is removed with the job.

The refusal says which rule broke, never a value the model wrote: it is reported to the scheduler.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
from pathlib import Path

from contracts.messages import PredictionFormat
from site_worker.containers import OutputRefused, read_output


class PredictionsRefused(ValueError):
    """The model's output is not in the benchmark's declared format."""


def _number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def check_predictions(folder: Path, declared: PredictionFormat, case_count: int, limit: int) -> bytes:
    """The declared table the model wrote in `folder`, as bytes, once it keeps the format."""
    name = f"/assay/out/{declared.file}"
    try:
        body = read_output(folder / declared.file, limit)
    except OutputRefused as refused:
        raise PredictionsRefused(f"{name} {refused}") from None
    try:
        rows = list(csv.reader(io.StringIO(body.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error):
        raise PredictionsRefused(f"{name} is not a UTF-8 CSV table") from None
    header, cases = (rows[0], rows[1:]) if rows else ([], [])
    if header != list(declared.columns):
        raise PredictionsRefused(f"{name} has {len(header)} column(s) that are not the declared "
                                 f"{','.join(declared.columns)}: only those may reach the evaluator")
    if len(cases) != case_count:
        raise PredictionsRefused(f"{name} has {len(cases)} row(s); the dataset has {case_count} cases")
    ids = set()
    for line, row in enumerate(cases, start=2):
        if len(row) != len(header):
            raise PredictionsRefused(f"{name} line {line} has {len(row)} field(s), not {len(header)}")
        if not all(_number(value) for value in row[1:]):
            raise PredictionsRefused(f"{name} line {line}: every column but {header[0]} must be a finite number")
        ids.add(row[0])
    if len(ids) != len(cases):
        raise PredictionsRefused(f"{name} names {len(cases) - len(ids)} case(s) twice")
    return body


def hand_over(body: bytes, declared: PredictionFormat, target: Path, like: Path) -> None:
    """What the evaluator sees: the checked table alone, in a folder of its own, owned as `like` (the folder the
    model wrote, which is the sandbox user's): a worker that is root hands it to the user containers run as."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    table = target / declared.file
    table.write_bytes(body)
    owner = like.stat()
    if os.geteuid() == 0:
        for path in (target, table):
            os.chown(path, owner.st_uid, owner.st_gid)
