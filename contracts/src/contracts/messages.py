"""The v1 payloads: commands (imperative), events (past tense), jobs and results, and query replies."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import Field, StringConstraints, field_validator, model_validator

from contracts.envelope import Envelope, Payload

Id = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
Digest = Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MetricName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]


class Role(StrEnum):
    OPERATOR = "operator"
    BENCHMARK_OWNER = "benchmark_owner"
    MODEL_OWNER = "model_owner"
    SITE = "site"
    SERVICE = "service"
    AUDITOR = "auditor"  # reads the streams and the whole board, to check one against the other; changes nothing


class EntityKind(StrEnum):
    MODEL = "model"
    DATASET = "dataset"


class EntityType(StrEnum):
    BENCHMARK = "benchmark"
    MODEL = "model"
    DATASET = "dataset"
    ACTOR = "actor"
    ORGANISATION = "organisation"


class JobState(StrEnum):
    """Where a job stands. A site reports RUNNING, REFUSED, FAILED, HELD and DECLINED; an accepted result makes it
    DONE. A REFUSED or FAILED job is run again only when an owner retries it (`assay job retry`), as a new round."""

    SCHEDULED = "SCHEDULED"
    RUNNING = "RUNNING"    # its site took it and runs it (the attempt it is on is beside it)
    REFUSED = "REFUSED"    # the site would not run it (its policy, a wrong image, changed data): never retried
    FAILED = "FAILED"      # it ran and failed for good (timed out, out of memory, output rejected, out of attempts)
    HELD = "HELD"          # it ran; its result waits at the site for the data owner's review
    DECLINED = "DECLINED"  # the data owner did not release its result; nothing of it left the site
    DONE = "DONE"          # its result is on the board
    CANCELLED = "CANCELLED"  # its pair's consent was revoked before a result counted: never run, never counted


SITE_STATES = (JobState.RUNNING, JobState.REFUSED, JobState.FAILED, JobState.HELD, JobState.DECLINED)


class Archive(Payload):
    """An image as `docker save` wrote it, in the artefact store under the image's id: what a site that lacks the
    image fetches, checks and loads."""

    sha256: Digest = Field(description="of the tarball: a site loads nothing else")
    size: int = Field(ge=1, description="bytes: a site refuses an image larger than its policy allows before fetching")
    encrypted: bool = Field(default=False, description="private: the archive is encrypted, and only a site its owner "
                                                         "granted the key to (`assay model grant`) can open it")


class ImageRef(Payload):
    digest: Digest = Field(description="the image id (sha256 of its config): images are run by digest, never by tag")
    name: Name = Field(description="a human name such as the tag it was built as; informative only")
    archive: Archive | None = Field(default=None, description="where it was pushed (`assay model push`); without "
                                                              "one, a site must have the image already")


class MetricKind(StrEnum):
    """How a metric follows from the evaluator's per-case scores (`cases.jsonl`): the site recomputes it there for its
    bootstrap replicates and aggregates, and the board pools it across sites accordingly."""

    AUC = "auc"                  # area under the ROC curve of `score` against `label`; pooled from score histograms
    SENSITIVITY = "sensitivity"  # of `score >= threshold` against `label`; these five pooled from confusion counts
    SPECIFICITY = "specificity"
    PPV = "ppv"
    NPV = "npv"
    ACCURACY = "accuracy"
    MEAN = "mean"                # the mean of each case's value named like the metric; pooled by cases (exactly)


CONFUSION_KINDS = (MetricKind.SENSITIVITY, MetricKind.SPECIFICITY, MetricKind.PPV, MetricKind.NPV,
                   MetricKind.ACCURACY)


class MetricSpec(Payload):
    name: MetricName
    minimum: float = 0.0
    maximum: float = 1.0
    higher_is_better: bool = True
    kind: MetricKind | None = Field(default=None, description="how it follows from the cases; none: the evaluator's "
                                                              "number alone, with no interval, pooled by cases")


class RunLimits(Payload):
    """What each of a benchmark's containers may use at a site; a site refuses a job that asks for more than its
    policy allows (it never runs it with less than asked)."""

    timeout_s: float = Field(default=600.0, gt=0, le=7 * 24 * 3600, description="wall time of one container")
    memory_mb: int = Field(default=2048, ge=64, le=4 * 1024 * 1024)
    cpus: float = Field(default=2.0, gt=0, le=1024)
    gpus: int = Field(default=0, ge=0, le=64, description="whole devices, for the model's container only")
    output_mb: int = Field(default=256, ge=1, le=1024 * 1024, description="what a container may write in all")


class PredictionFormat(Payload):
    """What a model must write: one CSV table with exactly these columns (the first names the case, the others are
    numbers), one row per case. The site checks it and gives the evaluator that table alone."""

    file: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.csv$")] = "predictions.csv"
    columns: tuple[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], ...] = Field(
        default=("case_id", "score"), min_length=2, max_length=64)


class Pooling(Payload):
    """What a site sends besides each metric's value, computed by the site from the evaluator's `cases.jsonl`: B paired
    bootstrap replicates of every metric with a kind, and the aggregates the benchmark allows for exact pooling."""

    replicates: int = Field(default=1000, ge=0, le=10_000, description="B; the resamples are seeded by benchmark, "
                                                                       "dataset and replicate, never by model")
    threshold: float = Field(default=0.5, description="a case is predicted positive when its score >= threshold")
    confusion: bool = Field(default=False, description="sites send confusion counts at the threshold")
    bins: int = Field(default=0, ge=0, le=1000, description="sites send per-class score histograms on this many "
                                                            "equal bins of score_range; 0: none")
    score_range: tuple[float, float] = Field(default=(0.0, 1.0), description="scores outside count in the end bins")
    min_count: int = Field(default=5, ge=1, le=1000, description="each cell of an aggregate holds 0 or at least this "
                                                                 "many cases; else the site withholds it and says so")

    @model_validator(mode="after")
    def _range_is_a_range(self) -> Pooling:
        low, high = self.score_range
        if not low < high:
            raise ValueError(f"score_range must be (low, high) with low < high, got {self.score_range}")
        return self


class PublicView(StrEnum):
    POOLED = "pooled"  # anyone sees every model's rank and pooled values (no site's own values)
    NONE = "none"      # nobody but those entitled sees a row; events say only that the board changed


class Sharing(Payload):
    """Who sees what of the board. The benchmark owner (and an auditor) sees everything; a model owner its own
    models' rows; a site what ran on its data; anyone else what `public` allows."""

    min_cases: int = Field(default=1, ge=1, description="a site's column appears only where it scored this many cases")
    pseudonyms: bool = Field(default=False, description="site columns are shown under stable pseudonyms, not ids")
    public: PublicView = PublicView.POOLED


MAX_CASES = 100_000_000  # more cases than any hospital's dataset holds: a count above it is a mistake or a lie


class DemoData(Payload):
    """The benchmark's demo data: a small folder (raw, as its preparator reads it; or prepared, its `data/` and
    `labels/`), a tar archive in the artefact store under the archive's sha256. A model asking to join is run on it
    first, at the benchmark's check site, and the approver sees how it went."""

    archive: Archive = Field(description="the folder as `assay benchmark register --demo-data` packed and pushed it")
    prepared: bool = Field(default=False, description="it holds data/ and labels/ already; else the preparator runs")
    cases: int = Field(ge=1, le=MAX_CASES, description="the cases it holds: a check's evaluator scores exactly these")


class BenchmarkSpec(Payload):
    benchmark_id: Id
    name: Name
    description: str = Field(default="", max_length=4000)
    preparator: ImageRef
    reference_model: ImageRef
    evaluator: ImageRef
    metrics: tuple[MetricSpec, ...] = Field(min_length=1, max_length=32)
    primary_metric: MetricName
    limits: RunLimits = Field(default_factory=RunLimits, description="what each container of its jobs may use")
    predictions: PredictionFormat | None = Field(default=None, description="the models' output, checked at the site; "
                                                                           "none: the evaluator sees what they wrote")
    pooling: Pooling = Field(default_factory=Pooling, description="replicates and aggregates the sites send")
    sharing: Sharing = Field(default_factory=Sharing, description="who sees what of the board")
    demo_data: DemoData | None = Field(default=None, description="what a model's compatibility check runs on")
    check_site: Id | None = Field(default=None, description="the benchmark owner's own site worker, which runs the "
                                                            "compatibility checks on the demo data")

    @model_validator(mode="after")
    def _primary_is_declared(self) -> BenchmarkSpec:
        if self.demo_data is not None and self.check_site is None:
            raise ValueError("demo_data needs check_site: the benchmark owner's site worker that runs models on it")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"metric names must be unique, got {names}")
        if self.primary_metric not in names:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not one of the declared metrics {names}")
        return self


# --- commands (request/reply, signed by the acting actor) -------------------------------------------------


class RegisterActor(Payload):
    TYPE: ClassVar[str] = "assay.v1.RegisterActor"
    actor_id: Id
    role: Role
    public_key: str = Field(min_length=43, max_length=43, description="raw Ed25519 public key, url-safe base64")
    display_name: Name
    also: tuple[Role, ...] = Field(default=(), max_length=5, description="more roles it holds, in its organisation "
                                                                         "(a hospital that also owns a model)")
    organisation: Id | None = Field(default=None, description="the organisation it acts for (registered first)")

    @field_validator("public_key")
    @classmethod
    def _is_ed25519(cls, value: str) -> str:
        from contracts.signing import check_public_key

        return check_public_key(value)


class RegisterOrganisation(Payload):
    """The operator enrols an organisation (a hospital, a vendor, a committee); its actors are registered in it."""

    TYPE: ClassVar[str] = "assay.v1.RegisterOrganisation"
    organisation_id: Id
    name: Name


class RotateKey(Payload):
    """An actor replaces its key, signing with the one it replaces: what that key signed before stays valid, nothing
    it signs from now on is accepted."""

    TYPE: ClassVar[str] = "assay.v1.RotateKey"
    public_key: str = Field(min_length=43, max_length=43, description="the new raw Ed25519 public key")

    @field_validator("public_key")
    @classmethod
    def _is_ed25519(cls, value: str) -> str:
        from contracts.signing import check_public_key

        return check_public_key(value)


class SuspendActor(Payload):
    """The operator stops an actor: nothing it signs is accepted from now on, its open jobs are cancelled, its
    results already on the board stay, marked."""

    TYPE: ClassVar[str] = "assay.v1.SuspendActor"
    actor_id: Id
    reason: Annotated[str, StringConstraints(min_length=1, max_length=2000, strip_whitespace=True)]


class RegisterBenchmark(Payload):
    TYPE: ClassVar[str] = "assay.v1.RegisterBenchmark"
    benchmark: BenchmarkSpec


class ApproveBenchmark(Payload):
    TYPE: ClassVar[str] = "assay.v1.ApproveBenchmark"
    benchmark_id: Id


class RegisterModel(Payload):
    TYPE: ClassVar[str] = "assay.v1.RegisterModel"
    model_id: Id
    name: Name
    image: ImageRef
    previous: Id | None = Field(default=None, description="the model this is a new version of (its owner's): a "
                                                          "changed model is a new version, never an edited one")




class RegisterDataset(Payload):
    TYPE: ClassVar[str] = "assay.v1.RegisterDataset"
    dataset_id: Id
    benchmark_id: Id
    name: Name
    content_hash: Digest
    case_count: int = Field(ge=1, le=MAX_CASES)
    statistics: dict[MetricName, float] = Field(max_length=64, description="the preparator's report; its `cases` "
                                                                            "is the case count")
    preparator_digest: Digest

    @model_validator(mode="after")
    def _cases_as_the_preparator_reported(self) -> RegisterDataset:
        reported = self.statistics.get("cases")
        if reported != self.case_count:
            raise ValueError(f"case_count {self.case_count} is not the count the preparator reported "
                             f"(statistics.cases {reported}); register what `assay dataset prepare` wrote")
        return self


class PairOf(Payload):
    """What every message about one pair names: a benchmark, and a model or dataset in it."""

    benchmark_id: Id
    kind: EntityKind
    entity_id: Id


class RequestAssociation(PairOf):
    TYPE: ClassVar[str] = "assay.v1.RequestAssociation"


class ApproveAssociation(PairOf):
    TYPE: ClassVar[str] = "assay.v1.ApproveAssociation"
    override: str = Field(default="", max_length=2000, description="approve although its check failed: why, kept in "
                                                                   "the pair's history")


Reason = Annotated[str, StringConstraints(min_length=1, max_length=2000, strip_whitespace=True)]


class ApprovalMode(StrEnum):
    NEVER = "never"    # the benchmark's owner decides each request
    ALWAYS = "always"  # every request of the kind is approved at once
    ALLOW = "allow"    # requests from the listed actors are approved at once; the others wait


class RejectBenchmark(Payload):
    TYPE: ClassVar[str] = "assay.v1.RejectBenchmark"
    benchmark_id: Id
    reason: Reason


class InviteAssociation(PairOf):
    """A benchmark's owner asks a model or dataset in; its owner accepts (`assay association request`)."""

    TYPE: ClassVar[str] = "assay.v1.InviteAssociation"


class RejectAssociation(PairOf):
    """The side that was asked says no: the benchmark's owner to a request, the entity's owner to an invitation."""

    TYPE: ClassVar[str] = "assay.v1.RejectAssociation"
    reason: Reason


class RevokeAssociation(PairOf):
    """Either side withdraws its consent: the pair's open jobs are cancelled, its results marked on the board."""

    TYPE: ClassVar[str] = "assay.v1.RevokeAssociation"
    reason: Reason


class SetApprovalPolicy(Payload):
    TYPE: ClassVar[str] = "assay.v1.SetApprovalPolicy"
    benchmark_id: Id
    kind: EntityKind
    mode: ApprovalMode
    allowed: tuple[Id, ...] = Field(default=(), max_length=1000, description="the actors `allow` approves")


class GrantImageKey(Payload):
    """A model owner gives one site the key of a private image: sealed to that site's key, so only it can open it.
    The scheduler plans the image's jobs at a site only once the site holds its key."""

    TYPE: ClassVar[str] = "assay.v1.GrantImageKey"
    image: Digest
    site_id: Id
    sealed_key: str = Field(min_length=40, max_length=200)


# --- queries (request/reply, read only) and the replies ------------------------------------------------------


class GetBenchmark(Payload):
    TYPE: ClassVar[str] = "assay.v1.GetBenchmark"
    benchmark_id: Id


class ShowLeaderboard(Payload):
    TYPE: ClassVar[str] = "assay.v1.ShowLeaderboard"
    benchmark_id: Id


class ListJobs(Payload):
    """The jobs the scheduler planned, newest first, narrowed by any of the filters."""

    TYPE: ClassVar[str] = "assay.v1.ListJobs"
    benchmark_id: Id | None = None
    site_id: Id | None = None
    state: JobState | None = None
    limit: int = Field(default=200, ge=1, le=1000)


class GetJob(Payload):
    TYPE: ClassVar[str] = "assay.v1.GetJob"
    job_id: Id


class ListDeadLetters(Payload):
    """The messages the platform's consumers gave up on, newest first, as the scheduling service keeps them (the
    operator's, signed)."""

    TYPE: ClassVar[str] = "assay.v1.ListDeadLetters"
    consumer: Annotated[str, StringConstraints(max_length=200)] | None = Field(default=None, description="one "
                                                                               "consumer's, e.g. site-hospital-a-jobs")
    letter_id: Annotated[str, StringConstraints(max_length=200)] | None = Field(default=None, description="one "
                                                                                "letter, by the start of its id")
    limit: int = Field(default=200, ge=1, le=1000)


class RetryJobs(Payload):
    """Run again a job that was REFUSED or FAILED, once its cause is fixed (an image loaded, data restored): one job,
    or every such job of a benchmark or a site (`failed`). Each becomes a new round of its job (`<id>-r<n>`), sent to
    its site anew. The operator, the benchmark's owner and the job's site may."""

    TYPE: ClassVar[str] = "assay.v1.RetryJobs"
    job_id: Id | None = None
    failed: bool = Field(default=False, description="every REFUSED or FAILED job not retried yet (narrowed below)")
    benchmark_id: Id | None = None
    site_id: Id | None = None

    @model_validator(mode="after")
    def _one_or_many(self) -> RetryJobs:
        if (self.job_id is None) == (not self.failed):
            raise ValueError("name one job (job_id) or ask for every failed one (failed), not both nor neither")
        return self


StreamName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
MessageId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class ReplayDeadLetter(Payload):
    """Run a dead letter's message again through the consumer that gave up on it, once the cause is fixed (a bug fixed
    and the service redeployed, what it refers to registered). The service that owns the consumer reads the message
    back from its stream by sequence, checks it is the letter's, and hands it to the consumer's own handler with the
    same checks and the same inbox, so it is processed once however often it is replayed. The operator's, signed;
    sent to `assay.v1.cmd.<service>.replay_dead_letter` of the consumer's service (`assay dead-letters replay`)."""

    TYPE: ClassVar[str] = "assay.v1.ReplayDeadLetter"
    letter_id: MessageId = Field(description="the letter, as the scheduler keeps it (`assay dead-letters list`)")
    consumer: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,127}$")]
    stream: StreamName
    sequence: int = Field(ge=1, description="the message's sequence in `stream`, as the letter gives it")
    message_id: MessageId = Field(description="its Nats-Msg-Id, as the letter gives it: the message read back must "
                                              "carry it")


class EditBenchmark(Payload):
    """The benchmark's whole new spec (same id); the registry refuses a change to a field frozen in OPERATION."""

    TYPE: ClassVar[str] = "assay.v1.EditBenchmark"
    benchmark: BenchmarkSpec


class ArchiveEntity(Payload):
    TYPE: ClassVar[str] = "assay.v1.ArchiveEntity"
    kind: EntityType
    entity_id: Id
    reason: Reason


class ListEntities(Payload):
    """What the registry holds of one kind, narrowed by any of the filters (signed: any registered actor may ask;
    a dataset's statistics are not listed)."""

    TYPE: ClassVar[str] = "assay.v1.ListEntities"
    kind: EntityType
    entity_id: Id | None = None
    owner: Id | None = Field(default=None, description="the owner (a dataset's: its site; an actor's: itself)")
    benchmark_id: Id | None = None
    state: Annotated[str, StringConstraints(pattern=r"^[A-Z_]{1,32}$")] | None = None
    limit: int = Field(default=500, ge=1, le=5000)


class ListAssociations(Payload):
    """The associations the asker may see (the benchmark's owner: its benchmark's; an entity's owner: its own; the
    operator: all), with their whole history."""

    TYPE: ClassVar[str] = "assay.v1.ListAssociations"
    benchmark_id: Id | None = None
    pending: bool = Field(default=False, description="only those waiting for a decision")


class CommandReply(Payload):
    """The reply to every command, and to a query that is refused."""

    TYPE: ClassVar[str] = "assay.v1.CommandReply"
    ok: bool
    message: str
    retry: bool = Field(default=False, description="refused for now: the service has not yet seen what it refers to")


class BenchmarkDetails(Payload):
    """The reply to GetBenchmark."""

    TYPE: ClassVar[str] = "assay.v1.BenchmarkDetails"
    owner_id: Id
    status: str = Field(description="DEVELOPMENT, OPERATION or ARCHIVED")
    benchmark: BenchmarkSpec


# --- events (facts, append-only in EVENTS) -----------------------------------------------------------------


class ActorRegistered(Payload):
    TYPE: ClassVar[str] = "assay.v1.ActorRegistered"
    actor_id: Id
    role: Role
    public_key: str
    key_id: str
    display_name: Name
    also: tuple[Role, ...] = ()
    organisation: Id | None = None


class OrganisationRegistered(Payload):
    TYPE: ClassVar[str] = "assay.v1.OrganisationRegistered"
    organisation_id: Id
    name: Name
    registered_by: Id


class ActorKeyRotated(Payload):
    TYPE: ClassVar[str] = "assay.v1.ActorKeyRotated"
    actor_id: Id
    role: Role
    public_key: str
    key_id: str
    previous_key_id: str


class ActorSuspended(Payload):
    TYPE: ClassVar[str] = "assay.v1.ActorSuspended"
    actor_id: Id
    role: Role
    suspended_by: Id
    reason: str


class BenchmarkRegistered(Payload):
    TYPE: ClassVar[str] = "assay.v1.BenchmarkRegistered"
    owner_id: Id
    benchmark: BenchmarkSpec


class BenchmarkApproved(Payload):
    TYPE: ClassVar[str] = "assay.v1.BenchmarkApproved"
    benchmark_id: Id
    approved_by: Id


class ModelRegistered(Payload):
    TYPE: ClassVar[str] = "assay.v1.ModelRegistered"
    model_id: Id
    owner_id: Id
    name: Name
    image: ImageRef
    previous: Id | None = None


class BenchmarkEdited(Payload):
    """A benchmark's spec as its owner changed it: in DEVELOPMENT anything but its id, in OPERATION only what does
    not define results (name, description, limits, sharing)."""

    TYPE: ClassVar[str] = "assay.v1.BenchmarkEdited"
    benchmark: BenchmarkSpec
    changed: tuple[str, ...]
    edited_by: Id


class EntityArchived(Payload):
    """Never scheduled again: its open jobs are cancelled; its results stay on the board, marked archived."""

    TYPE: ClassVar[str] = "assay.v1.EntityArchived"
    kind: EntityType
    entity_id: Id
    archived_by: Id
    reason: str


class DatasetRegistered(Payload):
    TYPE: ClassVar[str] = "assay.v1.DatasetRegistered"
    dataset_id: Id
    site_id: Id
    benchmark_id: Id
    name: Name
    content_hash: Digest
    case_count: int
    statistics: dict[str, float]


class AssociationRequested(Payload):
    TYPE: ClassVar[str] = "assay.v1.AssociationRequested"
    benchmark_id: Id
    kind: EntityKind
    entity_id: Id
    requested_by: Id


class AssociationApproved(Payload):
    TYPE: ClassVar[str] = "assay.v1.AssociationApproved"
    benchmark_id: Id
    kind: EntityKind
    entity_id: Id
    approved_by: Id
    by_policy: bool = Field(default=False, description="by the benchmark's approval policy, on its owner's word")


class BenchmarkRejected(Payload):
    TYPE: ClassVar[str] = "assay.v1.BenchmarkRejected"
    benchmark_id: Id
    rejected_by: Id
    reason: str


class AssociationInvited(PairOf):
    TYPE: ClassVar[str] = "assay.v1.AssociationInvited"
    invited_by: Id


class AssociationRejected(PairOf):
    TYPE: ClassVar[str] = "assay.v1.AssociationRejected"
    rejected_by: Id
    reason: str


class AssociationRevoked(PairOf):
    """Consent withdrawn: the scheduler cancels the pair's open jobs and plans none; the leaderboard marks its results
    and counts none that finished later."""

    TYPE: ClassVar[str] = "assay.v1.AssociationRevoked"
    revoked_by: Id
    reason: str


class ApprovalPolicySet(Payload):
    TYPE: ClassVar[str] = "assay.v1.ApprovalPolicySet"
    benchmark_id: Id
    kind: EntityKind
    mode: ApprovalMode
    allowed: tuple[Id, ...]
    set_by: Id


class HistoryEntry(Payload):
    action: str = Field(description="requested, invited, approved, accepted, rejected or revoked")
    actor: Id
    at: datetime
    reason: str = ""
    by_policy: bool = False


class CheckView(Payload):
    """A check before joining as the approver sees it: SCHEDULED, HELD (at its site, for review), PASSED (with its
    metrics), or FAILED, REFUSED, DECLINED or CANCELLED (with the reason)."""

    job_id: Id
    site_id: Id
    state: str
    reason: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    at: datetime


class AssociationView(Payload):
    benchmark_id: Id
    kind: EntityKind
    entity_id: Id
    entity_owner: Id
    status: str = Field(description="REQUESTED, INVITED, APPROVED, REJECTED or REVOKED")
    history: tuple[HistoryEntry, ...]
    check: CheckView | None = Field(default=None, description="the check its last request ran, and how it went")


class EntitySummary(Payload):
    kind: EntityType
    entity_id: Id
    name: str
    owner_id: Id
    state: str = Field(description="DEVELOPMENT, OPERATION or ARCHIVED (an actor: its role)")
    benchmark_id: Id | None = None
    detail: dict[str, str] = Field(default_factory=dict, description="what identifies it: image, content hash, ...")


class EntityList(Payload):
    """The reply to ListEntities."""

    TYPE: ClassVar[str] = "assay.v1.EntityList"
    entities: tuple[EntitySummary, ...]


class AssociationList(Payload):
    """The reply to ListAssociations."""

    TYPE: ClassVar[str] = "assay.v1.AssociationList"
    associations: tuple[AssociationView, ...]


class CheckOf(Payload):
    """What a check job checks: the model (on the demo data) or the dataset (with the reference model) asking to
    join."""

    kind: EntityKind
    entity_id: Id


class JobBinding(Payload):
    """What a job pins when it is planned and its result must match exactly: the artefacts that produce it."""

    benchmark_id: Id
    model_id: Id
    dataset_id: Id
    model_image: Digest
    evaluator_image: Digest
    dataset_hash: Digest
    case_count: int = Field(ge=1, description="as registered: the result must score exactly these cases, so a site "
                                              "cannot weigh more in the pooled values than the cases it registered")


class JobSpec(Payload):
    """What a site is asked to run; signed by the scheduling service, its binding carried into the result."""

    TYPE: ClassVar[str] = "assay.v1.Job"
    job_id: Id
    site_id: Id
    binding: JobBinding
    metrics: tuple[MetricSpec, ...]
    expires_at: datetime = Field(description="a site never starts the job after this time; a captured job cannot be "
                                             "replayed later")
    model_owner: Id | None = Field(default=None, description="who registered the model: a site's policy may accept "
                                                             "only some owners")
    limits: RunLimits = Field(default_factory=RunLimits, description="the benchmark's limits for each container")
    predictions: PredictionFormat | None = Field(default=None, description="the benchmark's declared output format")
    keys: dict[Digest, str] = Field(default_factory=dict, description="the keys of its private images, each sealed "
                                                                     "to this job's site")
    archives: dict[Digest, Archive] = Field(default_factory=dict, description="the pushed images of the job (model, "
                                                                             "evaluator) by image id")
    pooling: Pooling | None = Field(default=None, description="the benchmark's: what the site computes and sends "
                                                              "besides the metrics")
    check: CheckOf | None = Field(default=None, description="a check before joining: its result is shown to the "
                                                            "approver and never counts on the board")
    demo_data: DemoData | None = Field(default=None, description="a compatibility check runs on the benchmark's demo "
                                                                 "data (its archive's sha256 is the binding's "
                                                                 "dataset_hash), not on a dataset of the site")
    preparator: Digest | None = Field(default=None, description="the preparator that prepares raw demo data first")


class JobScheduled(Payload):
    TYPE: ClassVar[str] = "assay.v1.JobScheduled"
    job: JobSpec


class Confusion(Payload):
    """Cases by truth and by `score >= threshold`."""

    tp: int = Field(ge=0)
    fp: int = Field(ge=0)
    tn: int = Field(ge=0)
    fn: int = Field(ge=0)


class Histograms(Payload):
    """Cases per score bin (the benchmark's bins), for positive and for negative cases."""

    positive: tuple[int, ...] = Field(max_length=1000)
    negative: tuple[int, ...] = Field(max_length=1000)


class Evidence(Payload):
    """What a site computed from its per-case scores, which stay with it: B paired bootstrap replicates of each metric
    with a kind, and the aggregates the benchmark allows. `withheld` says what was not sent, and why."""

    replicates: dict[MetricName, tuple[float, ...]] = Field(default_factory=dict, max_length=32)
    confusion: Confusion | None = None
    histograms: Histograms | None = None
    withheld: tuple[Annotated[str, StringConstraints(max_length=300)], ...] = Field(default=(), max_length=8)


class SiteResult(Payload):
    """What leaves a site: declared metrics only, bound to everything that produced them; signed by the site."""

    TYPE: ClassVar[str] = "assay.v1.SiteResult"
    job_id: Id
    site_id: Id
    binding: JobBinding
    metrics: dict[MetricName, float]
    metrics_hash: Digest
    job: Envelope[JobSpec] = Field(description="the job as the scheduler signed it: what the result answers, checked "
                                               "without waiting for any other stream")
    worker_id: Name
    finished_at: datetime
    evidence: Evidence | None = Field(default=None, description="replicates and aggregates, as the benchmark asks")


class SiteReport(Payload):
    """What a site says about a job it does not (or not yet) answer with a result, on `assay.v1.reports.<site>`;
    signed by the site. The reason is the site's words: it never quotes what a container wrote."""

    TYPE: ClassVar[str] = "assay.v1.SiteReport"
    job_id: Id
    site_id: Id
    state: JobState
    reason: str = Field(max_length=2000)
    worker_id: Name
    at: datetime
    attempt: int = Field(default=1, ge=1, description="which delivery of the job this is (its queue's count)")

    @field_validator("state")
    @classmethod
    def _a_site_state(cls, state: JobState) -> JobState:
        if state not in SITE_STATES:
            raise ValueError(f"a site reports one of {[s.value for s in SITE_STATES]}, not {state.value}")
        return state


class JobStateChanged(Payload):
    """A job's state as the scheduler now records it, after its site reported it."""

    TYPE: ClassVar[str] = "assay.v1.JobStateChanged"
    job_id: Id
    site_id: Id
    benchmark_id: Id
    model_id: Id
    state: JobState
    reason: str
    check: CheckOf | None = Field(default=None, description="set when the job is a check before joining")


class JobCancelled(Payload):
    """The scheduler's word, signed, that a job must not run: kept under the job's key of the cancelled bucket, which
    its site looks up before it runs the job (its pair was revoked, an entity archived, an actor suspended)."""

    TYPE: ClassVar[str] = "assay.v1.JobCancelled"
    job_id: Id
    site_id: Id
    reason: str = Field(max_length=2000)


class CheckCompleted(Payload):
    """A check job's result, verified like any result (the site's signature, the scheduler's job, its binding) and
    never counted on the board. Its metrics are sealed to the approval service, which shows them to the pair's two
    sides only: nobody else who reads the events learns a site's or a model's figures from them."""

    TYPE: ClassVar[str] = "assay.v1.CheckCompleted"
    job_id: Id
    site_id: Id
    benchmark_id: Id
    kind: EntityKind
    entity_id: Id
    sealed_metrics: str = Field(max_length=20_000, description="the metrics as JSON, sealed to the approval service")
    case_count: int


class ResultAccepted(Payload):
    TYPE: ClassVar[str] = "assay.v1.ResultAccepted"
    job_id: Id
    site_id: Id
    binding: JobBinding
    metrics: dict[str, float] = Field(default_factory=dict, description="always empty: a site's own values are not "
                                                                        "broadcast; the board answers by who asks")


class ResultRejected(Payload):
    TYPE: ClassVar[str] = "assay.v1.ResultRejected"
    message_id: str
    site_id: str
    job_id: str | None
    reason: str


class Interval(Payload):
    """A 95% percentile interval over bootstrap replicates."""

    low: float
    high: float


class SiteValue(Payload):
    site: str
    value: float


class LeaderboardRow(Payload):
    rank: int = Field(description="1 + the number of models that beat it beyond doubt (their interval lies wholly "
                                  "above its own); models whose intervals overlap share a rank")
    model_id: Id
    site_values: dict[str, dict[str, float]] = Field(description="site (or its pseudonym) -> metric -> value")
    pooled: dict[str, float] = Field(description="metric -> pooled value over the sites (how: `pooling`)")
    case_count: int
    sites: int
    shared: bool = Field(default=False, description="another model has the same rank (shown `1=`)")
    pooling: dict[str, str] = Field(default_factory=dict, description="metric -> how its pooled value was computed")
    intervals: dict[str, Interval] = Field(default_factory=dict, description="metric -> the pooled value's interval")
    site_intervals: dict[str, dict[str, Interval]] = Field(default_factory=dict)
    site_cases: dict[str, int] = Field(default_factory=dict, description="site -> the cases it scored")
    bin_error: dict[str, float] = Field(default_factory=dict, description="metric -> the most a pooled value from "
                                                                          "histograms may differ from the exact one")
    mean_of_sites: dict[str, float] = Field(default_factory=dict, description="metric -> unweighted mean of sites")
    worst_site: dict[str, SiteValue] = Field(default_factory=dict, description="metric -> the worst site's value; "
                                                                              "its site is blank where hidden")
    rank_probabilities: tuple[float, ...] = Field(default=(), description="P(rank = k), k = 1..models, across the "
                                                                          "pooled replicates of the primary metric")
    marks: tuple[str, ...] = Field(default=(), description="consent withdrawn from its model or a dataset: what "
                                                           "stays on the board, marked, and what no longer counts")

    @property
    def rank_label(self) -> str:
        return f"{self.rank}=" if self.shared else str(self.rank)


class Leaderboard(Payload):
    """The reply to ShowLeaderboard: a benchmark's board, every model's per-site and pooled values with their
    intervals, ranked by the primary metric; as much of it as the asker may see."""

    TYPE: ClassVar[str] = "assay.v1.Leaderboard"
    benchmark_id: Id
    primary_metric: str
    metrics: tuple[str, ...]
    rows: tuple[LeaderboardRow, ...]
    higher_is_better: dict[str, bool] = Field(default_factory=dict)
    replicates: int = Field(default=0, description="B: how many bootstrap replicates the intervals come from")
    rank_stability: float | None = Field(default=None, description="median Kendall's tau between the ranking of the "
                                                                   "pooled values and each replicate's ranking")
    view: str = Field(default="public", description="whose view: full, or what an actor may see, or public")
    hidden: int = Field(default=0, description="rows not shown to this asker")
    archived: str = Field(default="", description="when, by whom and why the benchmark was archived")


class LeaderboardUpdated(Payload):
    """Announced for each model whose accepted results changed the board, once per burst (a short window after the
    burst's first result; its last is in it): where the model now stands, as far as the benchmark's sharing policy
    makes it public (with `public = none`, only that the board changed). Its size does not grow with the board; the
    whole board is the ShowLeaderboard query."""

    TYPE: ClassVar[str] = "assay.v1.LeaderboardUpdated"
    benchmark_id: Id
    primary_metric: str
    models: int = Field(description="how many models the board ranks now")
    model_id: Id | None
    rank: int | None
    pooled: dict[str, float]
    case_count: int | None
    sites: int | None
    intervals: dict[str, Interval] = Field(default_factory=dict)


class JobStatus(Payload):
    job_id: Id
    benchmark_id: Id
    model_id: Id
    dataset_id: Id
    site_id: Id
    state: JobState
    reason: str = Field(default="", description="why it is in this state, as its site reported it")
    updated_at: datetime
    check: CheckOf | None = Field(default=None, description="set when the job is a check before joining")
    attempts: int = Field(default=0, description="how often its site took it (the last report's attempt)")
    retried_as: Id | None = Field(default=None, description="the job that runs it again, once an owner retried it")


class JobList(Payload):
    """The reply to ListJobs."""

    TYPE: ClassVar[str] = "assay.v1.JobList"
    jobs: tuple[JobStatus, ...]


class JobDetails(Payload):
    """The reply to GetJob: where it stands and what it asks of its site."""

    TYPE: ClassVar[str] = "assay.v1.JobDetails"
    status: JobStatus
    job: JobSpec


class Capacity(Payload):
    """What a site worker can give its jobs at once."""

    cpus: float = Field(ge=0)
    memory_mb: int = Field(ge=0)
    gpus: tuple[str, ...] = Field(default=(), description="device ids (as NVML or nvidia-smi name them)")


class AuditHead(Payload):
    """What a site attests to: its audit log held `seq` entries, the last with `hash`, at `time`. Signed by the site,
    it travels in the site's heartbeats, so the centre can later prove what the log said then."""

    TYPE: ClassVar[str] = "assay.v1.AuditHead"
    seq: int = Field(ge=0)
    hash: str = Field(max_length=80)
    time: datetime


class SiteHeartbeat(Payload):
    """A site worker's word that it is alive, in the KV bucket `assay-sites` under `<site_id>.<worker_id>`; signed by
    the site. Silence is read from `at` and `every_s`."""

    TYPE: ClassVar[str] = "assay.v1.SiteHeartbeat"
    site_id: Id
    worker_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    version: Name
    policy_digest: Digest
    capacity: Capacity
    free: Capacity = Field(description="what is not given to running jobs now")
    running: int = Field(ge=0)
    load: float = Field(ge=0, description="the host's 1-minute load average")
    every_s: float = Field(gt=0, description="how often it beats: silent after a few missed beats")
    at: datetime
    audit_head: Envelope[AuditHead] | None = Field(default=None, description="the head of its audit log, as it "
                                                                             "signed it")


class DeadLetter(Payload):
    """A message a consumer gave up on, on `assay.v1.dlq.<consumer>`: why, and after how many deliveries."""

    TYPE: ClassVar[str] = "assay.v1.DeadLetter"
    consumer: str
    subject: str
    message_id: str
    deliveries: int
    error: str
    stream: str | None = Field(default=None, description="the stream that keeps the message (none: it never reached "
                                                         "one, as an outbox's message the server refused)")
    sequence: int | None = Field(default=None, ge=1, description="its sequence there: where a replay reads it back")


class ReplayOutcome(StrEnum):
    """What became of a dead letter's message, run again through its consumer (`assay dead-letters replay`)."""

    PROCESSED = "PROCESSED"                  # its consumer's handler ran it, and what that changed is committed
    ALREADY_PROCESSED = "ALREADY_PROCESSED"  # its consumer had processed it already (its inbox says so): nothing done
    FAILED = "FAILED"                        # its handler failed or refused it again, for the reason given: nothing
    # changed, and the letter stays for another replay once that is fixed


class DeadLetterReplayed(Payload):
    """A dead letter's message was run again through its consumer, for the operator: what became of it. Published by
    the service that owns the consumer (each service of its own consumers' letters, signed with its key, which
    `service` names); the scheduler keeps it with the letter."""

    TYPE: ClassVar[str] = "assay.v1.DeadLetterReplayed"
    service: Id
    letter_id: MessageId
    consumer: str
    stream: StreamName
    sequence: int = Field(ge=1)
    message_id: MessageId
    outcome: ReplayOutcome
    reason: str = Field(default="", max_length=4000, description="why it failed again")
    replayed_by: Id


class LetterReplay(Payload):
    """One replay of a letter's message, as the service that ran it said."""

    outcome: ReplayOutcome
    reason: str
    replayed_by: str
    at: datetime


class DeadLetterView(Payload):
    letter_id: str
    consumer: str
    subject: str
    message_id: str
    deliveries: int
    error: str
    at: datetime
    stream: str | None = None
    sequence: int | None = None
    replays: tuple[LetterReplay, ...] = Field(default=(), description="each replay of its message, oldest first")


class DeadLetterList(Payload):
    """The reply to ListDeadLetters."""

    TYPE: ClassVar[str] = "assay.v1.DeadLetterList"
    letters: tuple[DeadLetterView, ...]


COMMANDS: tuple[type[Payload], ...] = (
    RegisterActor, RegisterOrganisation, RotateKey, SuspendActor, RegisterBenchmark, EditBenchmark, ArchiveEntity,
    ApproveBenchmark, RejectBenchmark, RegisterModel, RegisterDataset,
    RequestAssociation, ApproveAssociation, InviteAssociation, RejectAssociation, RevokeAssociation,
    SetApprovalPolicy, GrantImageKey, RetryJobs, ReplayDeadLetter,
)
QUERIES: tuple[type[Payload], ...] = (GetBenchmark, ShowLeaderboard, ListJobs, GetJob, ListAssociations,
                                      ListEntities, ListDeadLetters)
REPLIES: tuple[type[Payload], ...] = (CommandReply, BenchmarkDetails, Leaderboard, JobList, JobDetails,
                                      AssociationList, EntityList, DeadLetterList)
EVENTS: tuple[type[Payload], ...] = (
    ActorRegistered, OrganisationRegistered, ActorKeyRotated, ActorSuspended, BenchmarkRegistered, BenchmarkEdited,
    EntityArchived, BenchmarkApproved, BenchmarkRejected, ModelRegistered, DatasetRegistered,
    AssociationRequested, AssociationInvited, AssociationApproved, AssociationRejected, AssociationRevoked,
    ApprovalPolicySet, JobScheduled, JobStateChanged, ResultAccepted, ResultRejected, LeaderboardUpdated,
    CheckCompleted, DeadLetterReplayed,
)
WORK: tuple[type[Payload], ...] = (JobSpec, SiteResult, SiteReport, SiteHeartbeat, DeadLetter, JobCancelled)
