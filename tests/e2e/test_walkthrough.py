"""The README's "Using it with your own benchmark", word for word: its commands, read from the README itself, run in
a shell against a platform that its own `assay up` started, with its own `benchmark.json`. The only liberties are
the ones a reader takes: their images are the demo's, tagged as the README names them; `/path/to/raw` is a real raw
folder; a step that needs an earlier one's job to have run waits for it, as a person would look again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from assay.demo.build import build_demo_images
from assay.demo.data import write_site_raw

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]


def blocks(section: str) -> list[str]:
    """The fenced blocks of one README section, in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}\n")
    body = text[start:text.index("\n## ", start + 1)]
    return re.findall(r"```(?:sh|json)\n(.*?)```", body, re.DOTALL)


def commands(block: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not
            line.lstrip().startswith("#")]


def test_the_readme_walkthrough_works_as_written(tmp_path: Path, docker_client) -> None:  # type: ignore[no-untyped-def]
    start, rest, spec = blocks("Using it with your own benchmark")[:3]
    images = build_demo_images(docker_client, tmp_path / "build")
    for image_id, tag in ((images.preparator, "my-preparator:1"), (images.models["reference"], "my-model:1"),
                          (images.evaluator, "my-evaluator:1")):
        docker_client.images.get(image_id).tag(*tag.split(":"))
    raw = tmp_path / "raw"
    write_site_raw(0, raw)
    home = tmp_path / "home"
    home.mkdir()
    (home / "benchmark.json").write_text(spec)
    json.loads(spec)  # the README's benchmark.json is valid JSON
    env = {**os.environ, "ASSAY_HOME": str(home), "COLUMNS": "200",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def shell(line: str, answer: str = "") -> str:
        line = line.replace("/path/to/raw", str(raw))
        done = subprocess.run(["bash", "-c", line], cwd=home, env=env, input=answer, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"`{line}` failed:\n{done.stdout}{done.stderr}"
        return done.stdout

    setup = commands(start)
    assert setup[0] == "source .venv/bin/activate" and setup[-1] == "assay up"
    for line in setup[1:-1]:
        shell(line)
    up = subprocess.Popen(["bash", "-c", "assay up"], cwd=home, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "Assay is up" in line:
                break
        else:
            pytest.fail("assay up did not come up")
        def states(check: bool) -> list[str]:
            listed = json.loads(shell("assay job list --benchmark my-benchmark --json"))["jobs"]
            return [job["state"] for job in listed if (job["check"] is not None) == check]

        said = {}
        for line in commands(rest):
            if line.startswith("assay results pending"):  # the dataset's check first, then the benchmark's job
                wait_for(lambda: "HELD" in states(True) + states(False), "a job to be held")
            if line.startswith("assay association list --pending"):
                wait_for(lambda: "DONE" in states(True), "the dataset's check to pass")
            if line.startswith("assay leaderboard show"):
                wait_for(lambda: "DONE" in states(False), "the result to count")
            said[line.split()[1] + " " + line.split()[2]] = shell(line, answer="y\n")
        flat = {key: " ".join(value.split()) for key, value in said.items()}
        assert "PASSED" in flat["association list"]  # the approver saw how the dataset's check went
        assert "my-model" in flat["leaderboard show"] and "view: full" in flat["leaderboard show"]
        assert (home / "board.png").read_bytes()[:4] == b"\x89PNG"
        assert "the board of my-benchmark is the one its signed results give" in flat["verify my-benchmark"]
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.wait(60)


def wait_for(condition, what: str, timeout_s: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(1)
