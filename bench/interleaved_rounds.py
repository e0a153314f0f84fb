"""Alternated rounds of measures on a noisy machine, and their ratios to the unsplit baseline.

Owns: running several measures once per round in alternating order, and the medians and quartiles
of each round's ratio to the same round's "unsplit" figure. Does not own: the measures themselves.
"""

from __future__ import annotations

import statistics


def interleaved(measures: dict, rounds: int) -> dict[str, list[float]]:
    """Run every measure once per round, in turn, so slow phases of a noisy machine hit them all;
    odd rounds run them in reverse order, so that none always runs first (or right after another)."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for index in range(rounds):
        for name in (list(measures) if index % 2 == 0 else list(reversed(measures))):
            samples[name].append(measures[name]())
    return samples


def round_ratios(samples: dict[str, list[float]], name: str) -> list[float]:
    """Each round's figure of `name` ÷ the same round's unsplit one."""
    return [a / b for a, b in zip(samples[name], samples["unsplit"], strict=True)]


def quartiles(values: list[float]) -> list[float]:
    """[lower quartile, upper quartile]: how far one round's ratio strays on this machine."""
    low, _, high = statistics.quantiles(values, n=4) if len(values) > 1 else (values * 3)
    return [low, high]


def against_unsplit(samples: dict[str, list[float]], name: str) -> tuple[float, float]:
    """(median of `name`'s figures, median over rounds of its figure ÷ the same round's unsplit one)."""
    return statistics.median(samples[name]), statistics.median(round_ratios(samples, name))
