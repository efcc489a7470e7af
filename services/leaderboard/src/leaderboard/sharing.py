"""Who sees what of a board, by the benchmark's sharing policy and the asker's signed identity.

The benchmark's owner and an auditor see everything. A model owner sees its own models' rows with the columns of the
sites that scored enough cases (`min_cases`); a site sees its own column in every row its data ran in; anyone sees
what `public` allows: every model's rank and pooled values (`pooled`), or nothing (`none`). Site columns shown to
anyone but the site itself go under pseudonyms when the policy says so: `site-1`, `site-2`, ... in the order the
sites' first results were accepted, which never changes afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from contracts.messages import BenchmarkSpec, Leaderboard, LeaderboardRow, LeaderboardUpdated, PublicView, Role, \
    SiteValue


@dataclass(frozen=True)
class Asker:
    """Who asked, as their signature says; nobody (an unsigned query) sees the public view."""

    actor_id: str | None = None
    role: str | None = None
    also: tuple[str, ...] = ()  # the other roles it holds

    def holds(self, role: Role) -> bool:
        return role in (self.role, *self.also)


NOBODY = Asker()


def pseudonyms(sites_in_order: Sequence[str]) -> dict[str, str]:
    """`site-1`, `site-2`, ... for the sites in the order their first result was accepted."""
    return {site: f"site-{n}" for n, site in enumerate(dict.fromkeys(sites_in_order), start=1)}


def sees_everything(asker: Asker, owner_id: str) -> bool:
    return asker.holds(Role.AUDITOR) or (asker.actor_id is not None and asker.actor_id == owner_id)


def view(board: Leaderboard, benchmark: BenchmarkSpec, *, owner_id: str, asker: Asker,
         model_owners: Mapping[str, str | None], site_order: Sequence[str]) -> Leaderboard:
    """What of `board` (the whole one) `asker` may see."""
    if sees_everything(asker, owner_id):
        return board.model_copy(update={"view": "full"})
    sharing, names = benchmark.sharing, pseudonyms(site_order)
    public = sharing.public is PublicView.POOLED
    rows, hidden = [], 0
    for row in board.rows:
        own = asker.actor_id is not None and model_owners.get(row.model_id) == asker.actor_id
        ran_here = asker.holds(Role.SITE) and asker.actor_id in row.site_values
        if not (own or ran_here or public):
            hidden += 1
            continue
        columns = {site for site in row.site_values if (own and row.site_cases.get(site, 0) >= sharing.min_cases)
                   or (ran_here and site == asker.actor_id)}

        def shown(site: str) -> str:
            return names.get(site, "site-?") if sharing.pseudonyms and site != asker.actor_id else site

        rows.append(_narrowed(row, columns, shown, with_pooled=own or public))
    who = asker.actor_id or "public"
    return board.model_copy(update={"rows": tuple(rows), "hidden": hidden, "view": who})


def _narrowed(row: LeaderboardRow, columns: set[str], shown, with_pooled: bool) -> LeaderboardRow:  # type: ignore[no-untyped-def]
    keep = sorted(columns)
    narrowed = {
        "site_values": {shown(s): row.site_values[s] for s in keep},
        "site_intervals": {shown(s): row.site_intervals[s] for s in keep if s in row.site_intervals},
        "site_cases": {shown(s): row.site_cases[s] for s in keep if s in row.site_cases},
        "worst_site": {name: SiteValue(site=shown(w.site) if w.site in columns else "", value=w.value)
                       for name, w in row.worst_site.items()},
    }
    if not with_pooled:  # a site seeing only its own column of a board the policy keeps private
        narrowed |= {"rank": 0, "shared": False, "pooled": {}, "pooling": {}, "intervals": {}, "bin_error": {},
                     "mean_of_sites": {}, "worst_site": {}, "rank_probabilities": (), "case_count": 0, "sites": 0}
    return row.model_copy(update=narrowed)


def announcement(board: Leaderboard, benchmark: BenchmarkSpec, model_id: str) -> LeaderboardUpdated:
    """The bounded event that announces a model's new standing: as public as the policy makes the board."""
    if benchmark.sharing.public is not PublicView.POOLED:
        return LeaderboardUpdated(benchmark_id=board.benchmark_id, primary_metric=board.primary_metric,
                                  models=len(board.rows), model_id=None, rank=None, pooled={}, case_count=None,
                                  sites=None)
    row = next(row for row in board.rows if row.model_id == model_id)
    return LeaderboardUpdated(benchmark_id=board.benchmark_id, primary_metric=board.primary_metric,
                              models=len(board.rows), model_id=row.model_id, rank=row.rank, pooled=row.pooled,
                              intervals=row.intervals, case_count=row.case_count, sites=row.sites)
