"""The `assay` command as a user runs it: `assay up` and Ctrl-C, readable refusals, the leaderboard as JSON.

The CLI runs in a thread so that the in-process services keep answering on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from contracts import messages as m
from contracts.signing import KeyPair
from tests.support.federation import Federation, fake_containers, next_events


def assay(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "assay", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_assay_up_starts_every_process_and_ctrl_c_stops_them_all(tmp_path: Path) -> None:
    KeyPair.generate().save(tmp_path / "keys" / "operator.key")
    KeyPair.generate().save(tmp_path / "keys" / "site-1.key")
    assert assay(tmp_path, "site", "add", "site-1").returncode == 0
    up = subprocess.Popen([sys.executable, "-m", "assay", "--home", str(tmp_path), "up"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, up.kill)  # a platform that never comes up ends the test, not CI
    watchdog.start()
    try:
        seen = []  # until it says it is up: platform.json is written a moment before it says so
        while not any("Assay is up" in line for line in seen):
            line = up.stdout.readline() if up.stdout else ""
            assert line, "assay up stopped before it was up:\n" + "".join(seen)
            seen.append(line)
        url = urlsplit(json.loads((tmp_path / "platform.json").read_text())["nats_url"])
        assert (url.hostname, url.username) == ("127.0.0.1", "cli") and url.port != 4222  # a random port, a user
        assert (tmp_path / "platform.json").stat().st_mode & 0o777 == 0o600, "it holds passwords"
        assert (tmp_path / "nats" / "nats.conf").stat().st_mode & 0o777 == 0o600
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
        output = "".join(seen) + rest
    finally:
        watchdog.cancel()
        up.kill()
    assert up.returncode == 0, output
    assert "Assay is up" in output
    assert not (tmp_path / "platform.json").exists()
    logs = {p.stem: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    assert set(logs) == {"nats", "registry", "approval", "scheduling", "leaderboard", "site-site-1"}
    for name, text in logs.items():
        if name == "nats":
            assert "Server Exiting" in text
        else:
            assert "shut down gracefully" in text, f"{name} did not stop cleanly:\n{text[-2000:]}"


async def test_the_leaderboard_prints_as_json_and_refusals_say_why(nats_url: str, tmp_path: Path) -> None:
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    try:
        await fed.start_site("site-a", fake_containers({"auc": 0.8, "sensitivity": 0.6}))
        await fed.benchmark()
        await fed.model("model-1")
        await fed.dataset("site-a", "ds-a")
        await next_events(nats_url, "assay.v1.evt.result.accepted", 1)
        (tmp_path / "platform.json").write_text(json.dumps({"nats_url": nats_url}))

        shown = await asyncio.to_thread(assay, tmp_path, "leaderboard", "show", "bench", "--json", "--as", "owner")
        assert shown.returncode == 0, shown.stderr
        board = m.Leaderboard.model_validate_json(shown.stdout)
        assert board.rows[0].site_values == {"site-a": {"auc": 0.8, "sensitivity": 0.6}} and board.view == "full"

        table = await asyncio.to_thread(assay, tmp_path, "leaderboard", "show", "bench")  # what anyone may see
        assert "model-1" in table.stdout and "0.800" in table.stdout and "site-a" not in table.stdout
        assert "view: public" in table.stdout

        refused = await asyncio.to_thread(assay, tmp_path, "benchmark", "approve", "bench", "--as", "vendor")
        assert refused.returncode == 1
        assert "actor vendor has role model_owner; this command needs operator" in refused.stderr

        missing = await asyncio.to_thread(assay, tmp_path, "model", "register", "m2", "--image", "sha256:" + "4" * 64, "--as", "nobody")
        assert missing.returncode == 1 and "error:" in missing.stderr
    finally:
        await fed.stop()


def test_names_that_would_escape_the_state_folder_are_refused(tmp_path: Path) -> None:
    for args in (("keys", "new", "../outside"), ("dataset", "register", "../../x", "--as", "site-1"),
                 ("site", "add", "a/b")):
        refused = assay(tmp_path / "home", *args)
        assert refused.returncode == 1, args
        assert "must match" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "outside.key").exists()


def test_a_service_that_cannot_reach_nats_says_why_without_the_password_and_one_missing_a_setting_says_which(
        tmp_path: Path) -> None:
    keys = {name: KeyPair.generate() for name in ("registry", "approval", "scheduling", "leaderboard")}
    keys["registry"].save(tmp_path / "registry.key")
    env = {**os.environ, "ASSAY_REGISTRY_NATS_URL": "nats://registry:s3cret@127.0.0.1:1",
           "ASSAY_REGISTRY_OPERATOR_PUBLIC_KEY": KeyPair.generate().public_key,
           "ASSAY_REGISTRY_KEY_FILE": str(tmp_path / "registry.key"),
           "ASSAY_REGISTRY_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}",
           "ASSAY_REGISTRY_SERVICE_KEYS": json.dumps({name: key.public_key for name, key in keys.items()})}
    service = subprocess.Popen([sys.executable, "-m", "assay.serve", "registry"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert service.stdout is not None
        said = ""
        while "cannot reach NATS" not in said:
            line = service.stdout.readline()
            assert line, "the service exited instead of saying why it waits"
            said = line
    finally:
        service.kill()
        service.wait()
    assert "registry cannot reach NATS at nats://127.0.0.1:1: ConnectionRefusedError" in said
    assert "s3cret" not in said

    missing = subprocess.run([sys.executable, "-m", "assay.serve", "registry"], capture_output=True, text=True,
                             timeout=60, env={**env, "ASSAY_REGISTRY_SERVICE_KEYS": "{}"})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "registry cannot start: ASSAY_REGISTRY_SERVICE_KEYS misses the public key of" in missing.stderr


def test_provision_against_an_unreachable_server_says_so_and_shows_no_password(tmp_path: Path) -> None:
    refused = assay(tmp_path, "provision", "--nats-url", "nats://provision:s3cret@127.0.0.1:1")

    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "cannot connect to NATS at nats://127.0.0.1:1" in refused.stderr and "s3cret" not in refused.stderr
