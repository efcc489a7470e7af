"""A bus of several servers is one URL with a comma-separated seed list: each client is given every server, each with
its own credentials, and what a log says names them all without any."""

from __future__ import annotations

from assay.access import CLI, Access
from service_kit.connection import inbox_of, servers, where

CLUSTER = "127.0.0.1:4222,127.0.0.1:4223,127.0.0.1:4224"


def test_a_seed_list_gives_every_server_its_credentials_and_logs_none() -> None:
    access = Access({CLI: "s3cret"})
    url = access.url(CLI, CLUSTER)
    assert servers(url) == [f"nats://cli:s3cret@{one}" for one in CLUSTER.split(",")]
    assert where(url) == ",".join(f"nats://{one}" for one in CLUSTER.split(","))
    assert "s3cret" not in where(url)
    assert inbox_of(url) == "_INBOX.cli", "the user of the first server names the inbox, as of every other"


def test_one_server_reads_as_before() -> None:
    url = Access({CLI: "pw"}).url(CLI, "127.0.0.1:4222")
    assert servers(url) == [url] == ["nats://cli:pw@127.0.0.1:4222"]
    assert where(url) == "nats://127.0.0.1:4222"
    assert servers(" tls://a:4222 , tls://b:4222 ") == ["tls://a:4222", "tls://b:4222"]
