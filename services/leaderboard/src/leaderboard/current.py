"""The current board of a benchmark, pooling again only the models whose results changed since it was last made.

Each process keeps the pooled models it made, with what they were made from (each result's job, metrics and cases);
before it uses one it lists that for the benchmark again from the database, so a result another replica accepted, a
transaction that rolled back, or a row changed in the database makes that model pooled again. The database stays
the only state: the cache can always be dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from contracts.messages import BenchmarkSpec, Leaderboard
from leaderboard.board import ModelBoard, Score, model_board, rank

Listing = tuple[str, str, str]  # (model, job, what the result says: its metrics and cases) for each accepted result
Load = Callable[[Sequence[str]], Awaitable[Iterable[Score]]]  # the scores of these models


@dataclass
class Boards:
    made: dict[tuple[str, str], tuple[frozenset[tuple[str, str]], ModelBoard]] = field(default_factory=dict)

    async def board(self, benchmark: BenchmarkSpec, listing: Iterable[Listing], load: Load) -> Leaderboard:
        """The whole board of `benchmark`, whose accepted results are `listing`; `load` fetches the scores of the
        models that must be pooled again."""
        made_from: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for model, job, said in listing:
            made_from[model].add((job, said))
        key = benchmark.benchmark_id
        stale = [model for model, results in made_from.items()
                 if self.made.get((key, model), (None,))[0] != frozenset(results)]
        if stale:
            by_model: dict[str, list[Score]] = defaultdict(list)
            for score in await load(stale):
                by_model[score.model_id].append(score)
            for model in stale:
                self.made[(key, model)] = (frozenset(made_from[model]),
                                           model_board(model, by_model[model], benchmark.metrics))
        return rank(benchmark, [self.made[(key, model)][1] for model in sorted(made_from)])
