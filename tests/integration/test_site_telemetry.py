"""A site's telemetry is the site's choice: by default nothing leaves it; where it chooses the centre's collector, it
sends over the authenticated endpoint (mutual TLS), proving who it is with the client certificate the operator
issued. The endpoint takes nothing from a worker without one, and a certificate is never sent over plain HTTP."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from site_worker.config import Settings as SiteSettings
from site_worker.main import otlp_tls
from tests.support.federation import Federation, fake_containers, next_events
from tests.support.otlp import Receiver, receiving

METRICS = {"auc": 0.8, "sensitivity": 0.7}


class Authority:
    """A CA that issues certificates: the collector's server certificate and each site's client certificate."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.key = folder, ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._build(self.name, self.key.public_key(), ca=True)
        self.file = self._write(name, self.cert, None)[0]

    def _build(self, subject: x509.Name, public: ec.EllipticCurvePublicKey, *, ca: bool = False,
               ip: str | None = None) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ip is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                            critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def _write(self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> tuple[Path, Path]:
        cert_file, key_file = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return cert_file, key_file

    def issue(self, name: str, ip: str | None = None) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        return self._write(name, self._build(subject, key.public_key(), ip=ip), key)


@pytest.fixture
def authorities(tmp_path: Path) -> tuple[Authority, Authority]:
    """The collector's CA (its server certificate) and the CA the operator issues sites' client certificates with."""
    return Authority(tmp_path, "central-ca"), Authority(tmp_path, "sites-ca")


@pytest.fixture
def collector(authorities: tuple[Authority, Authority]) -> Iterator[Receiver]:
    """The centre's authenticated endpoint: HTTPS, and a client certificate from the sites' CA required."""
    central, sites = authorities
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*central.issue("collector", ip="127.0.0.1"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(sites.file))
    with receiving(context) as received:
        yield received


@pytest.fixture
async def federation(nats_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    fed = Federation(nats_url, tmp_path, lambda name: f"sqlite+aiosqlite:///{tmp_path / name}.db")
    await fed.start_services()
    yield fed
    await fed.stop()


async def test_a_site_that_chose_the_centre_sends_its_traces_with_its_certificate_and_one_without_sends_none(
        federation: Federation, collector: Receiver, authorities: tuple[Authority, Authority]) -> None:
    central, sites = authorities
    cert, key = sites.issue("site-a")
    await federation.start_site("site-a", fake_containers(METRICS), otlp_endpoint=collector.url,
                                otlp_ca=central.file, otlp_cert=cert, otlp_key=key)
    await federation.start_site("site-b", fake_containers(METRICS), otlp_endpoint=collector.url,
                                otlp_ca=central.file)  # no client certificate: the endpoint takes nothing from it
    await federation.start_site("site-c", fake_containers(METRICS))  # the default: nothing leaves the site
    await federation.benchmark()
    await federation.model("model-1")
    for site in ("site-a", "site-b", "site-c"):
        await federation.dataset(site, f"ds-{site}")
    await next_events(federation.nats_url, "assay.v1.evt.result.accepted", 3)
    await federation.stop()  # each worker sends what it still holds
    federation.apps.clear()
    senders = {s.service for s in collector.spans} | {p.service for p in collector.points}
    assert senders == {"site-worker-site-a"}, "only the site with a certificate the centre issued got through"
    runs = [s for s in collector.spans if s.name.startswith("container ")]
    assert {s.name for s in runs} == {"container infer", "container evaluate"}


def test_a_client_certificate_is_never_sent_over_plain_http(tmp_path: Path) -> None:
    key = tmp_path / "site.key"
    key.write_text("")
    settings = {"site_id": "site-a", "nats_url": "nats://127.0.0.1:4222", "key_file": key,
                "scheduler_public_key": "x", "datasets_file": key, "work_dir": tmp_path}
    with pytest.raises(ValueError, match="for an https:// otlp_endpoint"):
        otlp_tls(SiteSettings(**settings, otlp_endpoint="http://central:4318", otlp_cert=key, otlp_key=key))
    with pytest.raises(ValueError, match="needs its key"):
        otlp_tls(SiteSettings(**settings, otlp_endpoint="https://central:4319", otlp_cert=key))
    assert otlp_tls(SiteSettings(**settings)) is None, "no endpoint: the site keeps its telemetry"
