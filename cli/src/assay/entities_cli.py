"""`assay benchmark|model|dataset|actor list` and `assay model|dataset show`: what exists, as a table or JSON, and
one entity with every association it is in and their history (as far as the asker is a side of them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from assay.home import speak_as
from contracts import messages as m

console = Console()
As = Annotated[str, typer.Option("--as", help="who asks (any registered actor signs the query)", callback=speak_as)]


def _send(payload: m.Payload, actor: str) -> dict:  # type: ignore[type-arg]
    from assay.cli import _send as send

    return send(payload, actor)


def entities_table(kind: m.EntityType, entities: tuple[m.EntitySummary, ...]) -> Table:
    actor, dataset = kind is m.EntityType.ACTOR, kind is m.EntityType.DATASET
    columns = [kind.value, "name", *([] if actor else ["owner"]), "role" if actor else "state",
               *(["benchmark"] if dataset else []), "details"]
    table = Table(title=f"{len(entities)} {kind.value}(s)")
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column == kind.value)
    for entity in entities:
        details = "; ".join(f"{k} {v[:19] + '…' if v.startswith('sha256:') else v}" for k, v in entity.detail.items())
        table.add_row(entity.entity_id, escape(entity.name), *([] if actor else [entity.owner_id]), entity.state,
                      *([entity.benchmark_id or ""] if dataset else []), details)
    return table


def lister(kind: m.EntityType) -> Callable[..., None]:
    def entity_list(actor: As, owner: Annotated[str | None, typer.Option(help="only this owner's")] = None,
                    benchmark: Annotated[str | None, typer.Option(help="datasets of this benchmark")] = None,
                    state: Annotated[str | None, typer.Option(help="DEVELOPMENT, OPERATION, ARCHIVED")] = None,
                    as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        found = m.EntityList.model_validate(_send(m.ListEntities(
            kind=kind, owner=owner, benchmark_id=benchmark, state=state.upper() if state else None), actor))
        if as_json:
            print(found.model_dump_json(indent=2))
        else:
            console.print(entities_table(kind, found.entities))

    entity_list.__doc__ = f"The {kind.value}s the registry holds (a table; --json), narrowed by the filters."
    return entity_list


def site_list(actor: As, organisation: Annotated[str | None, typer.Option(help="only this one's")] = None,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The sites the registry holds (actors whose role, or one of them, is site); `assay sites list` shows which are
    online."""
    found = m.EntityList.model_validate(_send(m.ListEntities(kind=m.EntityType.ACTOR, owner=organisation), actor))
    sites = tuple(e for e in found.entities if e.state == "site" or "site" in e.detail.get("also", ""))
    if as_json:
        print(m.EntityList(entities=sites).model_dump_json(indent=2))
    else:
        console.print(entities_table(m.EntityType.ACTOR, sites))


def shower(kind: m.EntityType) -> Callable[..., None]:
    def entity_show(entity_id: str, actor: As) -> None:
        from assay.association_cli import associations_table
        from assay.cli import say_error

        found = m.EntityList.model_validate(_send(m.ListEntities(kind=kind, entity_id=entity_id), actor)).entities
        if not found:
            say_error(f"no {kind.value} {entity_id} is registered; `assay {kind.value} list --as {actor}` shows "
                      "those there are")
            raise typer.Exit(1)
        console.print(entities_table(kind, found))
        pairs = m.AssociationList.model_validate(_send(m.ListAssociations(), actor)).associations
        mine = tuple(p for p in pairs if p.kind.value == kind.value and p.entity_id == entity_id)
        console.print(associations_table(m.AssociationList(associations=mine),
                                         f"its associations ({len(mine)}) that {actor} is a side of"))
        for pair in mine:
            for step in pair.history:
                console.print(f"  {pair.benchmark_id}: {step.at:%Y-%m-%d %H:%M} {step.action} by {step.actor}"
                              + (" (policy)" if step.by_policy else "") + (f": {escape(step.reason)}"
                                                                            if step.reason else ""))

    entity_show.__doc__ = f"One {kind.value}: what the registry holds, and its associations with their history."
    return entity_show
