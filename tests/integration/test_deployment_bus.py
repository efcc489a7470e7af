"""The CLI talks to a deployment's bus, not only to `assay up`'s: over TLS checked against the deployment's CA, as
its own NATS user (an nkey), by a flag, by the environment or by a profile file; a server it cannot trust, or a file
it cannot read, is refused with the reason. The services connect the same way."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import nats
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from contracts import messages as m
from contracts.streams import ensure_streams
from service_kit.connection import secured
from tests.conftest import serving_nats
from tests.support.federation import Federation


def certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it signed for 127.0.0.1: (CA bundle, server certificate, server key)."""
    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("assay test CA")).issuer_name(name("assay test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(name("central")).issuer_name(ca.subject)
              .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False).sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


def nkey(folder: Path, name: str) -> tuple[Path, str]:
    """A user nkey: its seed in a file (what the user keeps), and its public key (what the server is told)."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path = folder / f"{name}.nk"
    path.write_bytes(seed)
    return path, nkeys.from_seed(bytearray(seed)).public_key.decode()


def assay(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASSAY_NATS") and k != "ASSAY_PROFILE"}
    return subprocess.run([sys.executable, "-m", "assay", "--home", str(home), *args], capture_output=True, text=True,
                          timeout=120, env={**clean, "COLUMNS": "200", **env})


async def test_the_cli_reaches_a_tls_bus_as_its_own_nkey_user_by_flag_environment_or_profile(tmp_path: Path):
    ca, cert, key = certificate(tmp_path)
    services_seed, services_public = nkey(tmp_path, "services")
    cli_seed, cli_public = nkey(tmp_path, "cli")
    config = (f'tls {{\n  cert_file: "{cert}"\n  key_file: "{key}"\n}}\n'
              f'authorization {{\n  users: [\n    {{ nkey: "{services_public}" }}\n'
              f'    {{ nkey: "{cli_public}", permissions: {{ publish: ["assay.v1.cmd.>"], subscribe: ["_INBOX.>"] }} }}\n'
              '  ]\n}\n')
    with serving_nats(tmp_path / "nats", config) as plain:
        url = plain.replace("nats://", "tls://")
        nc = await nats.connect(url, **secured(url, services_seed, ca))
        await ensure_streams(nc.jetstream())
        await nc.close()
        fed = Federation(url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db",
                         connection={"nats_creds": services_seed, "nats_ca": ca})
        os.environ.update({"ASSAY_NATS_CREDS": str(services_seed), "ASSAY_NATS_CA": str(ca)})  # fed.send's
        try:
            await fed.start_services()
            await fed.benchmark()

            by_flag = await asyncio.to_thread(assay, tmp_path, "--nats", url, "--creds", str(cli_seed), "--ca",
                                              str(ca), "benchmark", "show", "bench")
            by_env = await asyncio.to_thread(assay, tmp_path, "job", "list", ASSAY_NATS_URL=url,
                                             ASSAY_NATS_CREDS=str(cli_seed), ASSAY_NATS_CA=str(ca))
            (tmp_path / "profile.toml").write_text(f'nats_url = "{url}"\ncreds = "{cli_seed}"\nca = "{ca}"\n')
            by_profile = await asyncio.to_thread(assay, tmp_path, "job", "list")
            (tmp_path / "profile.toml").unlink()
            untrusted = await asyncio.to_thread(assay, tmp_path, "--nats", url, "--creds", str(cli_seed), "job",
                                                "list")
            nobody = await asyncio.to_thread(assay, tmp_path, "--nats", url, "--ca", str(ca), "job", "list")
            missing = await asyncio.to_thread(assay, tmp_path, "--nats", url, "--creds", str(tmp_path / "none.nk"),
                                              "job", "list")
        finally:
            await fed.stop()
            for variable in ("ASSAY_NATS_CREDS", "ASSAY_NATS_CA"):
                os.environ.pop(variable, None)

    assert by_flag.returncode == 0 and '"benchmark_id": "bench"' in by_flag.stdout, by_flag.stderr
    assert by_env.returncode == 0 and "0 job(s)" in by_env.stdout, by_env.stderr
    assert by_profile.returncode == 0 and "0 job(s)" in by_profile.stdout, by_profile.stderr
    host = url.removeprefix("tls://")
    assert untrusted.returncode == 1 and f"cannot connect to NATS at tls://{host}" in untrusted.stderr
    assert "certificate verify failed" in untrusted.stderr
    assert nobody.returncode == 1 and f"cannot connect to NATS at tls://{host}" in nobody.stderr
    assert missing.returncode == 1 and "the NATS credentials file" in missing.stderr and "does not exist" in missing.stderr
    for said in (by_flag, by_env, by_profile, untrusted, nobody, missing):
        assert cli_seed.read_text() not in said.stdout + said.stderr  # the seed is never printed
    _ = m, pytest
