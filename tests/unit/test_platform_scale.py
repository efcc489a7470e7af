"""What `Platform(home, cluster=..., replicas=..., database=...)` accepts, and the configuration each server of its
cluster is given, as nats-server itself reads it (`-t`: check the file and exit)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from assay.home import Home
from assay.platform import Platform, cluster_config, free_ports, nats_server_binary, server_config
from assay.roster import Roster


@pytest.mark.parametrize(("options", "says"), [
    ({"cluster": 2}, "a cluster of two stops when either server does"),
    ({"cluster": 0}, "one nats-server, or a cluster of three or more"),
    ({"replicas": 2}, "PostgreSQL"),
    ({"replicas": 2, "database": "sqlite+aiosqlite:///x.db"}, "a SQLite file is one process's"),
    ({"replicas": 0}, "at least one process"),
    ({"leaf_port": -1}, "leaf_port=-1: a TCP port from 1024"),
    ({"leaf_port": 80}, "leaf_port=80: a TCP port from 1024"),
    ({"leaf_port": 65535, "cluster": 3}, r"one port per server \(3\)"),
])
def test_a_scale_that_cannot_work_is_refused_with_the_reason(tmp_path: Path, options: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Platform(Home(tmp_path), **options)


def test_a_cluster_keeps_each_stream_on_three_servers_and_one_server_on_itself(tmp_path: Path) -> None:
    assert Platform(Home(tmp_path)).stream_replicas == 1
    scaled = Platform(Home(tmp_path), cluster=5, replicas=2, database="postgresql+asyncpg://u@h:5432")
    assert scaled.stream_replicas == 3
    assert scaled.processes("leaderboard") == ["leaderboard", "leaderboard-2"]
    assert scaled.database_url("leaderboard") == "postgresql+asyncpg://u@h:5432/assay_leaderboard"


def test_every_server_of_a_cluster_is_given_a_configuration_nats_server_accepts(tmp_path: Path) -> None:
    Roster(tmp_path).save()  # the users.conf and system.conf every server includes
    ports = free_ports(7)  # three clients', three routes', server 1's leaf nodes'
    assert len(set(ports)) == 7
    for index in (1, 2, 3):
        config = tmp_path / f"cluster-{index}.conf"
        store = tmp_path / f"n{index}"
        store.mkdir()
        config.write_text(cluster_config(index, ports[index - 1], ports[3:6], "route-pw")
                          + server_config(store, leaf_port=ports[6] if index == 1 else 0))
        checked = subprocess.run([nats_server_binary(), "-t", "-c", str(config)], capture_output=True, text=True,
                                 timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        text = config.read_text()
        assert f"server_name: assay-nats-{index}" in text and "sync_interval: always" in text
        assert "domain: assay" in text and ("leafnodes" in text) == (index == 1)
        assert all(f"127.0.0.1:{port}" in text for port in ports[3:6]), "routes to every server of the cluster"
