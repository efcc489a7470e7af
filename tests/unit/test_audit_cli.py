"""`assay audit show` and `assay audit verify` against a site's log in a temporary state folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from assay import cli
from assay.audit_cli import audit_app
from assay.home import Home
from contracts.signing import KeyPair
from site_worker.audit import AuditLog

SITE = "hospital-a"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    home = Home(tmp_path)
    monkeypatch.setitem(cli.state, "home", home)  # what `assay --home` does in cli.py's callback
    return home


def site_log(home: Home) -> AuditLog:
    key = KeyPair.generate()
    key.save(home.key_file(SITE))
    log = AuditLog(home.site_dir(SITE) / "audit.jsonl", key)
    log.append("job_received", job_id="j1")
    log.append("job_run", job_id="j1", model_image="sha256:aa", dataset_hash="sha256:bb")
    log.append("result_released", job_id="j1", approved_by="dr-lee")
    log.append("job_refused", job_id="j2", reason="expired")
    return log


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(audit_app, list(args))
    return result.exit_code, " ".join(result.output.split())


def test_show_lists_every_entry_with_its_details(home: Home) -> None:
    site_log(home)
    code, out = run("show", "--site", SITE)
    assert code == 0
    assert "4 of 4 entries" in out
    for shown in ("job_received", "job_run", "result_released", "job_refused", "approved_by=dr-lee"):
        assert shown in out


def test_show_filters_by_job_and_kind(home: Home) -> None:
    site_log(home)
    code, out = run("show", "--site", SITE, "--job", "j2")
    assert code == 0 and "1 of 4 entries" in out and "reason=expired" in out and "job_run" not in out
    code, out = run("show", "--site", SITE, "--kind", "job_run")
    assert code == 0 and "1 of 4 entries" in out and "job_refused" not in out


def test_show_json_prints_one_entry_per_line(home: Home) -> None:
    site_log(home)
    result = CliRunner().invoke(audit_app, ["show", "--site", SITE, "--json", "--job", "j1"])
    assert result.exit_code == 0
    entries = [json.loads(line) for line in result.output.splitlines()]
    assert [(e["seq"], e["kind"]) for e in entries] == [(1, "job_received"), (2, "job_run"), (3, "result_released")]
    assert entries[1]["details"] == {"model_image": "sha256:aa", "dataset_hash": "sha256:bb"}


def test_verify_says_ok_with_the_count_and_the_key_that_signed_the_head(home: Home) -> None:
    log = site_log(home)
    code, out = run("verify", "--site", SITE)
    assert code == 0
    assert f"ok: 4 entries, chain intact, head signed by {log.key.key_id}" in out


def test_verify_names_the_changed_entry_and_fails(home: Home) -> None:
    log = site_log(home)
    lines = log.path.read_text().splitlines()
    lines[2] = lines[2].replace("dr-lee", "dr-who")
    log.path.write_text("\n".join(lines) + "\n")
    code, out = run("verify", "--site", SITE)
    assert code == 1
    assert "entry 3 (line 3, job j1) was changed after it was written (the 2 entries read before this are intact)" in out


def test_verify_without_the_sites_public_key_says_how_to_get_one(home: Home) -> None:
    site_log(home)
    home.key_file(SITE).with_suffix(".pub").unlink()
    code, out = run("verify", "--site", SITE)
    assert code == 1 and "no public key" in out


def test_a_site_without_a_log_is_an_error_not_an_empty_success(home: Home) -> None:
    for command in ("show", "verify"):
        code, out = run(command, "--site", "hospital-b")
        assert code == 1 and "site 'hospital-b' has no audit log" in out


def test_verify_names_a_log_deleted_beside_its_signed_head(home: Home) -> None:
    site_log(home).path.unlink()
    code, out = run("verify", "--site", SITE)
    assert code == 1 and "the log ends at entry 0, but the site signed entry 4" in out
