"""Which payload travels on which subject: the one table services, CLI, workers and the schema share."""

from __future__ import annotations

from contracts import messages as m
from contracts.envelope import Payload
from contracts.subjects import cmd, evt

EVENT_SUBJECTS: dict[type[Payload], str] = {
    m.ActorRegistered: evt("actor", "registered"),
    m.BenchmarkRegistered: evt("benchmark", "registered"),
    m.BenchmarkApproved: evt("benchmark", "approved"),
    m.ModelRegistered: evt("model", "registered"),
    m.DatasetRegistered: evt("dataset", "registered"),
    m.AssociationRequested: evt("association", "requested"),
    m.AssociationApproved: evt("association", "approved"),
    m.JobScheduled: evt("job", "scheduled"),
    m.JobFailed: evt("job", "failed"),
    m.ResultAccepted: evt("result", "accepted"),
    m.ResultRejected: evt("result", "rejected"),
    m.LeaderboardUpdated: evt("leaderboard", "updated"),
}

COMMAND_SUBJECTS: dict[type[Payload], str] = {
    m.RegisterActor: cmd("registry", "register_actor"),
    m.RegisterBenchmark: cmd("registry", "register_benchmark"),
    m.RegisterModel: cmd("registry", "register_model"),
    m.RegisterDataset: cmd("registry", "register_dataset"),
    m.GetBenchmark: cmd("registry", "get_benchmark"),
    m.ApproveBenchmark: cmd("approval", "approve_benchmark"),
    m.RequestAssociation: cmd("approval", "request_association"),
    m.ApproveAssociation: cmd("approval", "approve_association"),
    m.ShowLeaderboard: cmd("leaderboard", "show"),
}


def event_subject(payload: Payload) -> str:
    return EVENT_SUBJECTS[type(payload)]
