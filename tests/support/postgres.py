"""A private PostgreSQL cluster on a random loopback port, for the tests (the `postgres_server` fixture) and for
`just bench --cluster` (the services' replicas share their databases on it): `initdb` and `pg_ctl` from the
installed server binaries, as the `postgres` user when run as root (initdb refuses root), trust auth, gone at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL server's bin folder, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_postgres(bindir: Path) -> Iterator[str]:
    """Start a throwaway cluster; its SQLAlchemy base URL (no database), e.g. postgresql+asyncpg://postgres@host:port."""
    root = Path(tempfile.mkdtemp(prefix="assay-pg-"))  # not under pytest's 0700 root: postgres must reach it
    os.chmod(root, 0o777)
    data = root / "data"
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    try:
        subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"],
                       check=True, capture_output=True)
        port = _free_port()
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                        "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start"], check=True, capture_output=True)
        try:
            yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}"
        finally:
            subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
