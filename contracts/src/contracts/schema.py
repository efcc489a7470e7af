"""Generates the JSON Schema of every v1 message into contracts/schema/ (`python -m contracts.schema`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from contracts import messages as m
from contracts.envelope import Envelope, Payload

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"


def schemas() -> dict[str, str]:
    """File name -> schema text, for every message that crosses a process: in its envelope, or bare for a reply."""
    out: dict[str, str] = {}
    for payload in (*m.COMMANDS, *m.QUERIES, *m.EVENTS, *m.WORK, *m.REPLIES):
        model: type[Payload] = payload
        schema = model.model_json_schema() if payload in m.REPLIES else Envelope[model].model_json_schema()  # type: ignore[valid-type]
        schema["title"] = payload.TYPE
        out[f"{payload.__name__}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.json"):
        stale.unlink()
    written = []
    for name, text in schemas().items():
        (directory / name).write_text(text)
        written.append(directory / name)
    return written


if __name__ == "__main__":
    paths = write(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR)
    print(f"wrote {len(paths)} schemas to {paths[0].parent}")
