"""Which payload travels on which subject, and what answers a request: the one table services, CLI and workers share."""

from __future__ import annotations

from contracts import messages as m
from contracts.envelope import Payload
from contracts.subjects import cmd, evt, job_evt, job_kind, matches

# each event's subject, or for a job's events the pattern of them all: a job's kind is its subject's last token
# (`event_subject`), so a reader of check jobs alone is delivered no evaluation job's events
EVENT_SUBJECTS: dict[type[Payload], str] = {
    m.ActorRegistered: evt("actor", "registered"),
    m.ActorSuspended: evt("actor", "suspended"),
    m.ActorKeyRotated: evt("key", "rotated"),
    m.OrganisationRegistered: evt("organisation", "registered"),
    m.BenchmarkRegistered: evt("benchmark", "registered"),
    m.BenchmarkApproved: evt("benchmark", "approved"),
    m.BenchmarkEdited: evt("benchmark", "edited"),
    m.EntityArchived: evt("entity", "archived"),
    m.BenchmarkRejected: evt("benchmark", "rejected"),
    m.ModelRegistered: evt("model", "registered"),
    m.DatasetRegistered: evt("dataset", "registered"),
    m.AssociationRequested: evt("association", "requested"),
    m.AssociationApproved: evt("association", "approved"),
    m.AssociationInvited: evt("association", "invited"),
    m.AssociationRejected: evt("association", "rejected"),
    m.AssociationRevoked: evt("association", "revoked"),
    m.ApprovalPolicySet: evt("approval_policy", "set"),
    m.JobScheduled: job_evt("scheduled"),
    m.JobStateChanged: job_evt("state_changed"),
    m.ResultAccepted: evt("result", "accepted"),
    m.ResultRejected: evt("result", "rejected"),
    m.CheckCompleted: evt("check", "completed"),
    m.LeaderboardUpdated: evt("leaderboard", "updated"),
    m.DeadLetterReplayed: evt("dead_letter", "replayed"),
}


def event_subject(payload: Payload) -> str:
    """Where the event `payload` is published: its type's subject, a job's with the job's kind filled in."""
    if isinstance(payload, m.JobScheduled):
        return job_evt("scheduled", job_kind(payload.job.check))
    if isinstance(payload, m.JobStateChanged):
        return job_evt("state_changed", job_kind(payload.check))
    return EVENT_SUBJECTS[type(payload)]


def event_type(subject: str) -> type[Payload] | None:
    """The payload type of the events on `subject` (None: no event travels there)."""
    return next((payload for payload, pattern in EVENT_SUBJECTS.items() if matches(pattern, subject)), None)


# the one service that may publish each event: every consumer checks the event is signed by its key
SERVICES = ("registry", "approval", "scheduling", "leaderboard")
EVENT_PUBLISHERS: dict[type[Payload], str] = {
    m.ActorRegistered: "registry", m.ActorSuspended: "registry", m.ActorKeyRotated: "registry", m.OrganisationRegistered: "registry", m.BenchmarkRegistered: "registry", m.ModelRegistered: "registry",
    m.DatasetRegistered: "registry", m.BenchmarkEdited: "registry", m.EntityArchived: "registry",
    m.BenchmarkApproved: "approval", m.AssociationRequested: "approval",
    m.AssociationApproved: "approval", m.BenchmarkRejected: "approval", m.AssociationInvited: "approval",
    m.AssociationRejected: "approval", m.AssociationRevoked: "approval", m.ApprovalPolicySet: "approval",
    m.JobScheduled: "scheduling", m.JobStateChanged: "scheduling",
    m.ResultAccepted: "leaderboard",
    m.ResultRejected: "leaderboard", m.LeaderboardUpdated: "leaderboard", m.CheckCompleted: "leaderboard",
}
# events every service publishes about itself (its own consumers' dead letters it replayed): each is signed by the
# service its `service` names, which must own what it speaks of
OWN_EVENTS: tuple[type[Payload], ...] = (m.DeadLetterReplayed,)


def publisher_of(payload: Payload) -> str | None:
    """The service whose key must sign the event `payload` (None: `payload` is no event)."""
    if isinstance(payload, OWN_EVENTS):
        return str(getattr(payload, "service"))
    return EVENT_PUBLISHERS.get(type(payload))


def service_of(consumer: str) -> str | None:
    """The service whose durable consumer `consumer` is (durables are named `<owner>-<what it reads>`), if any."""
    return next((service for service in SERVICES if consumer.startswith(f"{service}-")), None)


def replay_subject(service: str) -> str:
    """Where `service` answers the operator's replay of its own consumers' dead letters (m.ReplayDeadLetter): one
    command, answered by each service on its own subject."""
    return cmd(service, "replay_dead_letter")


# commands change state; queries only read. Both are request/reply on assay.v1.cmd.<service>.<verb>.
COMMAND_SUBJECTS: dict[type[Payload], str] = {
    m.RegisterActor: cmd("registry", "register_actor"),
    m.SuspendActor: cmd("registry", "suspend_actor"),
    m.RotateKey: cmd("registry", "rotate_key"),
    m.RegisterOrganisation: cmd("registry", "register_organisation"),
    m.RegisterBenchmark: cmd("registry", "register_benchmark"),
    m.RegisterModel: cmd("registry", "register_model"),
    m.RegisterDataset: cmd("registry", "register_dataset"),
    m.EditBenchmark: cmd("registry", "edit_benchmark"),
    m.ArchiveEntity: cmd("registry", "archive_entity"),
    m.ApproveBenchmark: cmd("approval", "approve_benchmark"),
    m.RequestAssociation: cmd("approval", "request_association"),
    m.ApproveAssociation: cmd("approval", "approve_association"),
    m.RejectBenchmark: cmd("approval", "reject_benchmark"),
    m.InviteAssociation: cmd("approval", "invite_association"),
    m.RejectAssociation: cmd("approval", "reject_association"),
    m.RevokeAssociation: cmd("approval", "revoke_association"),
    m.SetApprovalPolicy: cmd("approval", "set_approval_policy"),
    m.GrantImageKey: cmd("scheduling", "grant_image_key"),
    m.RetryJobs: cmd("scheduling", "retry_jobs"),
}
QUERY_SUBJECTS: dict[type[Payload], str] = {
    m.GetBenchmark: cmd("registry", "get_benchmark"),
    m.ShowLeaderboard: cmd("leaderboard", "show"),
    m.ListJobs: cmd("scheduling", "list_jobs"),
    m.GetJob: cmd("scheduling", "get_job"),
    m.ListAssociations: cmd("approval", "list_associations"),
    m.ListEntities: cmd("registry", "list_entities"),
    m.ListDeadLetters: cmd("scheduling", "list_dead_letters"),
}
REQUEST_SUBJECTS: dict[type[Payload], str] = {**COMMAND_SUBJECTS, **QUERY_SUBJECTS}

# what a service answers with when it does what was asked; a refusal is always a CommandReply with ok=False
REPLY_TYPES: dict[type[Payload], type[Payload]] = {
    **{command: m.CommandReply for command in COMMAND_SUBJECTS},
    m.GetBenchmark: m.BenchmarkDetails,
    m.ShowLeaderboard: m.Leaderboard,
    m.ListJobs: m.JobList,
    m.GetJob: m.JobDetails,
    m.ListAssociations: m.AssociationList,
    m.ListEntities: m.EntityList,
    m.ListDeadLetters: m.DeadLetterList,
    m.ReplayDeadLetter: m.CommandReply,  # on replay_subject(service), not one subject: the consumer's service answers
}
