"""Consent withdrawn from a pair, as the board shows it: results the pair's site finished before the revocation stay
on the board, marked; any finished after it are not counted. A pair approved again later counts again. A pure rule
of the stored results and the approval service's events, so `assay verify` reaches the same board."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from contracts.envelope import aware
from contracts.messages import Leaderboard

Pair = tuple[str, str]  # (kind, entity id): ("model", "m1") or ("dataset", "ds-1")


@dataclass(frozen=True)
class Withdrawal:
    at: datetime
    by: str
    reason: str
    what: str = "revoked"  # or "archived": the entity was retired by its owner, from every benchmark


def with_archives(withdrawn: Mapping[Pair, Withdrawal], archived: Mapping[Pair, Withdrawal]) -> dict[Pair, Withdrawal]:
    """The withdrawals of a board's pairs, and the archived models and datasets (the earlier of the two counts)."""
    merged = dict(withdrawn)
    for pair, archive in archived.items():
        if pair not in merged or aware(archive.at) < aware(merged[pair].at):
            merged[pair] = archive
    return merged


def with_suspensions(withdrawn: Mapping[Pair, Withdrawal], suspended: Mapping[str, Withdrawal],
                     results: Iterable[tuple[str, str | None, str, str]]) -> dict[Pair, Withdrawal]:
    """And the models of a suspended owner and the datasets of a suspended site, from the moment of the suspension:
    `results` are (model, its owner, site, dataset)."""
    implied: dict[Pair, Withdrawal] = {}
    for model, owner, site, dataset in results:
        if owner is not None and owner in suspended:
            implied[("model", model)] = suspended[owner]
        if site in suspended:
            implied[("dataset", dataset)] = suspended[site]
    return with_archives(withdrawn, implied)


@dataclass
class Consents:
    """The last revocation and the last approval of each pair of one benchmark, by the approval service's clock."""

    revoked: dict[Pair, Withdrawal]
    approved: dict[Pair, datetime]

    def withdrawn(self) -> dict[Pair, Withdrawal]:
        """The pairs whose last word is a revocation."""
        return {pair: w for pair, w in self.revoked.items()
                if pair not in self.approved or aware(self.approved[pair]) < aware(w.at)}


def withdrawals(consents: Consents, archived: Mapping[Pair, Withdrawal], suspended: Mapping[str, Withdrawal],
                results: Iterable[tuple[str, str | None, str, str]]) -> dict[Pair, Withdrawal]:
    """Every withdrawal that concerns `results` (model, its owner, site, dataset): revocations of one benchmark's
    pairs, archived models and datasets, and suspended owners and sites; the earliest of each pair's counts."""
    return with_suspensions(with_archives(consents.withdrawn(), archived), suspended, results)


def retirement(archived: Mapping[Pair, Withdrawal], benchmark_id: str) -> str:
    """What the board of an archived benchmark says of it; "" while it is not."""
    retired = archived.get(("benchmark", benchmark_id))
    return "" if retired is None else f"archived by {retired.by} on {retired.at:%Y-%m-%d %H:%M}: {retired.reason}"


def counts(model_id: str, dataset_id: str, finished_at: datetime, withdrawn: Mapping[Pair, Withdrawal]) -> bool:
    """Whether a result counts: none finished after its model's or its dataset's consent was withdrawn."""
    return all(aware(finished_at) <= aware(w.at) for pair, w in withdrawn.items()
               if pair in (("model", model_id), ("dataset", dataset_id)))


def marks(model_id: str, datasets: Iterable[str], withdrawn: Mapping[Pair, Withdrawal]) -> tuple[str, ...]:
    """What the board says beside a model's row: each withdrawal that concerns it."""
    concerned = [("model", model_id), *(("dataset", d) for d in sorted(set(datasets)))]
    return tuple(f"{kind} {entity} {w.what} by {w.by} on {aware(w.at):%Y-%m-%d %H:%M} UTC: {w.reason}; results "
                 "finished before stay, marked, later ones do not count"
                 for kind, entity in concerned if (w := withdrawn.get((kind, entity))) is not None)



def marked(board: Leaderboard, datasets: Mapping[str, Iterable[str]],
           withdrawn: Mapping[Pair, Withdrawal]) -> Leaderboard:
    """`board` with each row's withdrawals beside it (`datasets`: the datasets each model's counted results used)."""
    if not withdrawn:
        return board
    return board.model_copy(update={"rows": tuple(
        row.model_copy(update={"marks": marks(row.model_id, datasets.get(row.model_id, ()), withdrawn)})
        for row in board.rows)})
