"""A grid search that widens a numeric axis whenever the best trial sits on its edge.

A choice on the edge of a grid says only that the best value may lie beyond it. The search
scores the whole grid, then, while the best point sits on the first or last value of a
widenable axis, adds the next value out (the edge times the grid's own step ratio there)
and scores it with the best point's other coordinates, at most `max_widenings` times per
axis. The result names the axes whose choice is still on an edge after that.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Point = tuple[Any, ...]


@dataclass
class SearchResult:
    """The best point (axis name -> value), every trial's score by label, the final axes and
    the axes whose chosen value is still the first or last of its (widened) axis."""

    best: dict[str, Any]
    score: float
    trials: dict[str, float]
    axes: dict[str, list[Any]]
    at_edge: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The result as the tuning record and the bench JSON carry it."""
        return {
            **self.best,
            "score": round(self.score, 5),
            "trials": self.trials,
            "grid": self.axes,
            "at_edge": self.at_edge,
        }


def widening_grid_search(
    axes: Mapping[str, Sequence[Any]],
    score: Callable[[dict[str, Any]], float | None],
    *,
    widen: Sequence[str] = (),
    max_widenings: int = 2,
    label: Callable[[dict[str, Any]], str] | None = None,
) -> SearchResult:
    """The point of `axes` (name -> values, each sorted ascending if widenable) with the
    highest `score` (None: the point cannot be built, left out; the first of equal scores
    wins), widening the `widen` axes as the module says. Raises ValueError when no point
    scores."""
    grid = {name: list(values) for name, values in axes.items()}
    names = list(grid)
    label = label or _label
    scores: dict[Point, float] = {}
    trials: dict[str, float] = {}

    def run(points: list[Point]) -> None:
        for point in points:
            if point in scores:
                continue
            params = dict(zip(names, point, strict=True))
            value = score(params)
            scores[point] = -math.inf if value is None else float(value)
            if value is not None:
                trials[label(params)] = round(float(value), 5)

    run(list(itertools.product(*grid.values())))
    widened = dict.fromkeys(widen, 0)
    while True:
        best = _best(scores)
        grown = False
        for axis in widen:
            position = names.index(axis)
            values = grid[axis]
            value = _next_out(values, best[position])
            if value is None or widened[axis] >= max_widenings:
                continue
            widened[axis] += 1
            grid[axis] = sorted([*values, value])
            run([best[:position] + (value,) + best[position + 1 :]])
            grown = True
        if not grown:
            break
    best = _best(scores)
    if not math.isfinite(scores[best]):
        raise ValueError("no trial of the grid could be scored")
    chosen = dict(zip(names, best, strict=True))
    at_edge = [a for a in widen if len(grid[a]) > 1 and chosen[a] in (grid[a][0], grid[a][-1])]
    if at_edge:
        log.warning("search: %s still on the edge of its grid after widening", at_edge)
    return SearchResult(chosen, scores[best], trials, grid, at_edge)


def _best(scores: Mapping[Point, float]) -> Point:
    """The point with the highest score, the first scored of equal ones."""
    return max(scores, key=lambda p: scores[p])  # max keeps the first of equal keys


def _next_out(values: Sequence[Any], chosen: Any) -> Any | None:
    """The value one geometric step beyond `chosen` when it is the first or last of
    `values` (at least two positive numbers); None inside the grid."""
    if len(values) < 2 or chosen not in (values[0], values[-1]) or values[0] <= 0:
        return None
    if chosen == values[-1]:
        out = values[-1] * values[-1] / values[-2]
    else:
        out = values[0] * values[0] / values[1]
    return type(values[0])(round(out, 6)) if isinstance(values[0], float) else int(round(out))


def _label(params: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
