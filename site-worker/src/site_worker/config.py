"""Site worker settings (environment prefix ASSAY_SITE_)."""

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ASSAY_SITE_")
    site_id: str
    key_file: Path                      # the site's Ed25519 key: results, reports and the audit head are signed with it
    scheduler_public_key: str           # jobs not signed by this key are never run
    nats_url: str = "nats://127.0.0.1:4222"  # tls://… for TLS; the worker only ever connects out
    nats_creds: Path | None = None      # its NATS credentials file (nkey or user JWT), where the URL carries none
    nats_ca: Path | None = None         # the CA bundle the central server's certificate is checked against
    nats_domain: str | None = None      # the centre's JetStream domain (`assay`), where nats_url is a leaf node of the
    # site's own: the worker's JetStream requests and key-value writes then name it, to be carried to the centre
    datasets_file: Path                 # JSON {dataset_id: prepared dataset folder}, written by `assay dataset prepare`
    work_dir: Path                      # per-job outputs; per-case scores stay here
    state_dir: Path | None = None       # the held results and the audit log (default: work_dir)
    policy_file: Path | None = None     # TOML: what may run here and what leaves unreviewed (none: hold every result)
    worker_id: str = "worker-1"
    max_deliver: int = 3
    max_jobs: int = 4                   # jobs taken at once; they run as the CPUs, memory and GPUs allow, fairly
    gpus: str = "auto"                  # the GPUs jobs may have: "auto" (nvidia-smi / NVML), "" (none), or "0,1"
    ack_wait_s: float = 60.0
    heartbeat_s: float = 15.0           # in_progress() while a container runs, well inside ack_wait
    release_every_s: float = 1.0        # how often the worker looks for the data owner's decisions to send
    keep_failed_days: float = 30.0      # what a failed job wrote (its log, its outputs) is removed after this long
    sites_every_s: float = 10.0         # how often it says it is alive (and what it has free) in the sites' bucket
    images_s3: str | None = None        # pushed images in S3/MinIO (s3://KEY:SECRET@host:port/bucket); none: the bus's
    # the site's choice: no endpoint keeps its traces and metrics at the site (the default); its own collector; or the
    # centre's authenticated endpoint (https://central:4319), proving who it is with the client certificate the
    # operator issued (otlp_cert, otlp_key), the collector's certificate checked against otlp_ca
    otlp_endpoint: str | None = None
    otlp_ca: Path | None = None
    otlp_cert: Path | None = None
    otlp_key: Path | None = None
    alive_file: Path | None = None      # written every few seconds while the bus and the Docker engine answer

    @property
    def state(self) -> Path:
        return self.state_dir or self.work_dir

    @property
    def review_file(self) -> Path:
        return self.state / "review.sqlite"

    @property
    def audit_file(self) -> Path:
        return self.state / "audit.jsonl"
