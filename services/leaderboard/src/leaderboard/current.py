"""The current board of a benchmark, pooling again only the models whose results changed since it was last made, and
ranking again only when one did.

Each process keeps the pooled models it made, with what they were made from (each result's job, metrics and cases),
and the ranked board it made from them; before it uses them it lists that for the benchmark again from the database,
so a result another replica accepted, a transaction that rolled back, or a row changed in the database makes that
model pooled again and the board ranked again. The database stays the only state: the cache can always be dropped.
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
    ranked: dict[str, tuple[object, Leaderboard]] = field(default_factory=dict)  # by benchmark: what it was made of
    rankings: int = 0  # how often a board was ranked (a query of a current board ranks nothing: the tests count)

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
        models = sorted(made_from)
        made_of = (benchmark.model_dump_json(), tuple((model, self.made[(key, model)][0]) for model in models))
        if (cached := self.ranked.get(key)) is not None and cached[0] == made_of:
            return cached[1]
        self.rankings += 1
        board = rank(benchmark, [self.made[(key, model)][1] for model in models])
        self.ranked[key] = (made_of, board)
        return board
