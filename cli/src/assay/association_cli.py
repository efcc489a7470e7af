"""`assay association`: a pair's whole consent, for each side. The entity's owner asks (or accepts an invitation),
the benchmark's owner approves, rejects, invites and sets auto-approval policies, either side revokes; everyone
lists what it is a side of, with its history. Approving or rejecting many at once shows what will change first."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from assay.home import speak_as
from contracts import messages as m

association_app = typer.Typer(help="Join a benchmark: request, invite, approve, reject, revoke, policies, lists.",
                              no_args_is_help=True)
console = Console()
As = Annotated[str, typer.Option("--as", help="the key (actor) that signs this command", callback=speak_as)]
Model = Annotated[str | None, typer.Option(help="the model")]
Dataset = Annotated[str | None, typer.Option(help="the dataset")]
Reason = Annotated[str, typer.Option("--reason", help="why: kept in the pair's history and told to the other side")]


def _send(payload: m.Payload, actor: str) -> dict:  # type: ignore[type-arg]
    from assay.cli import _send as send

    return send(payload, actor)


def _entity(model: str | None, dataset: str | None) -> tuple[m.EntityKind, str]:
    from assay.cli import _entity as entity

    return entity(model, dataset)


@association_app.command("request")
def association_request(benchmark_id: str, actor: As, model: Model = None, dataset: Dataset = None) -> None:
    """Ask to join a benchmark with your model or dataset (on an invitation: accept it)."""
    kind, entity = _entity(model, dataset)
    _send(m.RequestAssociation(benchmark_id=benchmark_id, kind=kind, entity_id=entity), actor)


@association_app.command("accept")
def association_accept(benchmark_id: str, actor: As, model: Model = None, dataset: Dataset = None) -> None:
    """Accept the benchmark owner's invitation: with yours, the two consents."""
    association_request(benchmark_id, actor, model, dataset)


@association_app.command("invite")
def association_invite(benchmark_id: str, actor: As, model: Model = None, dataset: Dataset = None) -> None:
    """Invite a model or dataset to your benchmark (benchmark owner); its owner accepts."""
    kind, entity = _entity(model, dataset)
    _send(m.InviteAssociation(benchmark_id=benchmark_id, kind=kind, entity_id=entity), actor)


@association_app.command("revoke")
def association_revoke(benchmark_id: str, actor: As, reason: Reason, model: Model = None,
                       dataset: Dataset = None) -> None:
    """Withdraw consent (either side): its open jobs are cancelled, its results stay on the board, marked."""
    kind, entity = _entity(model, dataset)
    _send(m.RevokeAssociation(benchmark_id=benchmark_id, kind=kind, entity_id=entity, reason=reason), actor)


@association_app.command("policy")
def association_policy(benchmark_id: str, actor: As,
                       kind: Annotated[m.EntityKind, typer.Option(help="which requests: model or dataset")],
                       mode: Annotated[m.ApprovalMode, typer.Option(help="never, always, or allow (the listed)")],
                       allow: Annotated[list[str] | None, typer.Option(help="an actor `allow` approves; repeat")] = None
                       ) -> None:
    """Approve a kind of request at once: never (decide each), always, or from the listed actors."""
    _send(m.SetApprovalPolicy(benchmark_id=benchmark_id, kind=kind, mode=mode, allowed=tuple(allow or ())), actor)


def _listed(actor: str, benchmark_id: str | None = None, pending: bool = False) -> m.AssociationList:
    return m.AssociationList.model_validate(_send(m.ListAssociations(benchmark_id=benchmark_id, pending=pending),
                                                  actor))


STYLES = {"APPROVED": "green", "REQUESTED": "yellow", "INVITED": "yellow", "REJECTED": "red", "REVOKED": "red",
          "PASSED": "green", "SCHEDULED": "yellow", "HELD": "yellow"}


def check_line(check: m.CheckView | None, sep: str = ", ") -> str:
    """How the request's check went: its metrics (`sep` between them), or its state and reason (rich markup)."""
    if check is None:
        return ""
    said = (sep.join(f"{name} {value:.3f}" for name, value in sorted(check.metrics.items())) if check.state == "PASSED"
            else check.reason)
    return f"[{STYLES.get(check.state, 'red')}]{check.state}[/] at {check.site_id}" + (f":{sep[1:] or ' '}"
                                                                                        f"{escape(said)}" if said
                                                                                        else "")


def associations_table(listed: m.AssociationList, title: str) -> Table:
    """One row per pair; one benchmark's pairs name it in the title, not on every row."""
    benchmarks = {pair.benchmark_id for pair in listed.associations}
    one = benchmarks.pop() if len(benchmarks) == 1 else None
    table = Table(title=title + (f" in {one}" if one and one not in title else ""))
    for column in ("benchmark", "kind", "entity", "owner", "status", "check", "last step")[1 if one else 0:]:
        table.add_column(column, overflow="fold", ratio=2 if column == "check" else None)
    for pair in listed.associations:
        last = pair.history[-1] if pair.history else None
        step = "" if last is None else (f"{last.action} by {last.actor} {last.at:%Y-%m-%d %H:%M}"
                                        + (" (policy)" if last.by_policy else "")
                                        + (f": {last.reason}" if last.reason else ""))
        cells = (pair.benchmark_id, pair.kind.value, pair.entity_id, pair.entity_owner,
                 f"[{STYLES.get(pair.status, 'white')}]{pair.status}[/]", check_line(pair.check, ",\n"), escape(step))
        table.add_row(*cells[1 if one else 0:])
    return table


@association_app.command("list")
def association_list(actor: As, benchmark: Annotated[str | None, typer.Option(help="one benchmark's")] = None,
                     pending: Annotated[bool, typer.Option("--pending", help="only those waiting")] = False,
                     as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The pairs you are a side of (the operator: all), where each stands and its last step."""
    listed = _listed(actor, benchmark, pending)
    if as_json:
        print(listed.model_dump_json(indent=2))
        return
    console.print(associations_table(listed, f"{len(listed.associations)} association(s)"
                                             + (" waiting for a decision" if pending else "")))


@association_app.command("show")
def association_show(benchmark_id: str, actor: As, model: Model = None, dataset: Dataset = None) -> None:
    """One pair's whole history: every request, invitation, decision and revocation, with who, when and why."""
    kind, entity = _entity(model, dataset)
    found = [p for p in _listed(actor, benchmark_id).associations if (p.kind, p.entity_id) == (kind, entity)]
    if not found:
        from assay.cli import say_error

        say_error(f"{kind.value} {entity} has no association with {benchmark_id} that {actor} may see")
        raise typer.Exit(1)
    pair = found[0]
    console.print(f"{kind.value} {entity} in {benchmark_id} (owner {pair.entity_owner}): [bold]{pair.status}[/bold]")
    if (check := pair.check) is not None:
        what = "on the benchmark's demo data" if kind is m.EntityKind.MODEL else "with the benchmark's reference model"
        console.print(f"its check {what}, job {check.job_id} ({check.at:%Y-%m-%d %H:%M:%S}): {check_line(check)}")
    history = Table(show_header=True)
    for column in ("when", "step", "by", "reason"):
        history.add_column(column, overflow="fold")
    for step in pair.history:
        history.add_row(f"{step.at:%Y-%m-%d %H:%M:%S}", step.action + (" (policy)" if step.by_policy else ""),
                        step.actor, escape(step.reason))
    console.print(history)


def _decide_many(benchmark_id: str, actor: As, model: str | None, dataset: str | None, everything: bool, yes: bool,
                 what: str, make) -> None:  # type: ignore[no-untyped-def]
    """One pair, or every pending request of the benchmark after a preview and a question."""
    if not everything:
        kind, entity = _entity(model, dataset)
        _send(make(kind, entity), actor)
        return
    if model or dataset:
        from assay.cli import say_error

        say_error("give --model/--dataset or --all-pending, not both")
        raise typer.Exit(2)
    pending = [p for p in _listed(actor, benchmark_id, pending=True).associations if p.status == "REQUESTED"]
    if not pending:
        console.print(f"no request waits for a decision on {benchmark_id}")
        return
    console.print(associations_table(m.AssociationList(associations=tuple(pending)),
                                     f"{what} {len(pending)} request(s) to join {benchmark_id}"))
    if not yes and not typer.confirm(f"{what} these {len(pending)} requests?"):
        raise typer.Exit(1)
    for pair in pending:
        _send(make(pair.kind, pair.entity_id), actor)


AllPending = Annotated[bool, typer.Option("--all-pending", help="every request waiting on this benchmark")]
Yes = Annotated[bool, typer.Option("--yes", help="do not ask")]


Override = Annotated[str, typer.Option("--override", help="approve although its check failed: why, kept in its "
                                                           "history")]


@association_app.command("approve")
def association_approve(benchmark_id: str, actor: As, model: Model = None, dataset: Dataset = None,
                        all_pending: AllPending = False, yes: Yes = False, override: Override = "") -> None:
    """Approve a requested model or dataset (benchmark owner); --all-pending shows them all first and asks. A request
    whose check failed is approved only with --override REASON."""
    _decide_many(benchmark_id, actor, model, dataset, all_pending, yes, "approve",
                 lambda kind, entity: m.ApproveAssociation(benchmark_id=benchmark_id, kind=kind, entity_id=entity,
                                                           override=override))


@association_app.command("reject")
def association_reject(benchmark_id: str, actor: As, reason: Reason, model: Model = None, dataset: Dataset = None,
                       all_pending: AllPending = False, yes: Yes = False) -> None:
    """Reject a request (benchmark owner) or an invitation (its invitee), with the reason; --all-pending too."""
    _decide_many(benchmark_id, actor, model, dataset, all_pending, yes, "reject",
                 lambda kind, entity: m.RejectAssociation(benchmark_id=benchmark_id, kind=kind, entity_id=entity,
                                                          reason=reason))
