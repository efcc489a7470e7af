"""A site's policy: what may run on its data, how much each container may use, and which results leave without the
data owner's review. Read from a TOML file the hospital keeps; a job outside it is refused before any container
starts, with the rule it breaks."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contracts.canonical import canonical
from contracts.envelope import describe
from contracts.messages import Digest, Id, JobSpec

ANY = "*"


class Release(StrEnum):
    HOLD = "hold"              # every result waits for `assay results approve`
    AUTO = "auto"              # a result that passes the checks leaves at once
    BENCHMARKS = "benchmarks"  # automatic for the benchmarks listed in `release.benchmarks`, held for the rest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Models(_Strict):
    allow: tuple[Digest, ...] = Field(default=(), description="only these image digests run; empty: any not denied")
    deny: tuple[Digest, ...] = ()


class Maximum(_Strict):
    """The most one container of a job may ask for; a job asking more is refused, never run with less."""

    timeout_s: float = Field(default=3600.0, gt=0)
    memory_mb: int = Field(default=4096, ge=64)
    cpus: float = Field(default=2.0, gt=0)
    gpus: int = Field(default=0, ge=0, description="0: no job that asks for a GPU runs here")
    output_mb: int = Field(default=4096, ge=1)
    image_mb: int = Field(default=20480, ge=1, description="the largest pushed image this site fetches")


class ReleaseRule(_Strict):
    rule: Release = Release.HOLD
    benchmarks: tuple[Id, ...] = ()

    @model_validator(mode="after")
    def _benchmarks_only_with_their_rule(self) -> ReleaseRule:
        if self.rule is Release.BENCHMARKS and not self.benchmarks:
            raise ValueError('rule "benchmarks" releases only the benchmarks listed in `benchmarks`: list them')
        if self.rule is not Release.BENCHMARKS and self.benchmarks:
            raise ValueError(f'`benchmarks` is used only with rule = "benchmarks", not {self.rule.value!r}')
        return self


class SitePolicy(_Strict):
    benchmarks: tuple[Id | str, ...] = Field(default=(ANY,), description='benchmark ids, or "*" for any')
    model_owners: tuple[Id | str, ...] = Field(default=(ANY,), description='actor ids of model owners, or "*"')
    models: Models = Models()
    limits: Maximum = Maximum()
    release: ReleaseRule = ReleaseRule()

    @model_validator(mode="after")
    def _wildcards_alone(self) -> SitePolicy:
        for name in ("benchmarks", "model_owners"):
            values = getattr(self, name)
            if ANY in values and len(values) > 1:
                raise ValueError(f'{name}: "*" accepts any, so it stands alone; got {list(values)}')
            if not values:
                raise ValueError(f'{name} is empty, so nothing could run here; list ids, or "*" for any')
        if overlap := set(self.models.allow) & set(self.models.deny):
            raise ValueError(f"models: {sorted(overlap)} both allowed and denied")
        return self

    @cached_property  # frozen: made once (its canonical JSON cost 0.13 ms, two or three times a job)
    def digest(self) -> str:
        """Names this policy's content: heartbeats and the audit log carry it, so a change shows."""
        return "sha256:" + hashlib.sha256(canonical(self.model_dump(mode="json"))).hexdigest()

    def holds(self, benchmark_id: str) -> bool:
        """Whether a result of `benchmark_id` waits for the data owner."""
        if self.release.rule is Release.BENCHMARKS:
            return benchmark_id not in self.release.benchmarks
        return self.release.rule is Release.HOLD


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file, the field and what to write."""


def load_policy(path: Path | None) -> SitePolicy:
    """The policy in `path` (TOML), or the default where there is no file: any benchmark the site joined, every
    result held for review."""
    if path is None or not path.exists():
        return SitePolicy()
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"site policy {path} is not valid TOML: {exc}") from None
    try:
        return SitePolicy.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(f"site policy {path}: {describe(exc)}") from None


class PolicyFile:
    """The policy in force, read again when its file changes. An invalid file at start stops the worker; one edited
    into an invalid state later leaves the last valid policy in force, and says so (`error`)."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.error = path, ""
        self.logged: str | None = None  # the digest the audit log last names (None until it was read)
        self._stamp = self._stat()
        self.current = load_policy(path)

    def _stat(self) -> tuple[float, int] | None:
        try:
            found = self.path.stat() if self.path else None
        except FileNotFoundError:
            return None
        return (found.st_mtime, found.st_size) if found else None

    def fresh(self) -> SitePolicy:
        stamp = self._stat()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.current, self.error = load_policy(self.path), ""
            except PolicyError as exc:
                self.error = f"{exc}; the previous policy {self.current.digest} stays in force"
        return self.current


@dataclass(frozen=True)
class Verdict:
    runs: bool
    reason: str  # the rule it breaks, or what will happen to its result

    def __bool__(self) -> bool:
        return self.runs


def judge(policy: SitePolicy, job: JobSpec) -> Verdict:
    """Whether `job` may run here, and why not: the first rule it breaks, in words the scheduler's user reads."""
    bound, asked, most = job.binding, job.limits, policy.limits
    if ANY not in policy.benchmarks and bound.benchmark_id not in policy.benchmarks:
        return Verdict(False, f"the site's policy accepts benchmarks {list(policy.benchmarks)}, not "
                              f"{bound.benchmark_id}")
    if ANY not in policy.model_owners and job.model_owner not in policy.model_owners:
        return Verdict(False, f"the site's policy accepts models of {list(policy.model_owners)}, and model "
                              f"{bound.model_id} is {job.model_owner or 'of an owner not named in the job'}'s")
    if bound.model_image in policy.models.deny:
        return Verdict(False, f"the site's policy denies image {bound.model_image} (model {bound.model_id})")
    if policy.models.allow and bound.model_image not in policy.models.allow:
        return Verdict(False, f"image {bound.model_image} (model {bound.model_id}) is not on the site's allow-list")
    for name, wanted, allowed, unit in (("timeout_s", asked.timeout_s, most.timeout_s, " s"),
                                        ("memory_mb", asked.memory_mb, most.memory_mb, " MB"),
                                        ("cpus", asked.cpus, most.cpus, ""), ("gpus", asked.gpus, most.gpus, ""),
                                        ("output_mb", asked.output_mb, most.output_mb, " MB")):
        if wanted > allowed:
            return Verdict(False, f"the benchmark asks {name} = {wanted:g}{unit} per container; this site allows at "
                                  f"most {allowed:g}{unit}")
    held = ("held for the data owner's review" if policy.holds(bound.benchmark_id)
            else "released once it passes the checks")
    return Verdict(True, f"it may run; its result will be {held}")
