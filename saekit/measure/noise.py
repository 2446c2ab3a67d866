"""Noise floors: a figure repeated over seeds, as a mean and a 95% confidence interval.

SAE benchmark metrics are noisier than they look (Chanin, arXiv 2605.18229): another draw of the
synthetic data or another training seed moves them. A study that repeats its runs over seeds
reports each figure as `Estimate.of(per-seed values)`, the mean ± the half-width of a Student-t 95%
interval, and each comparison as `Estimate.of` the per-seed *differences* (paired by seed, so what
a seed shares, its data and its dictionary, cancels). A difference whose interval covers zero is
"within noise": the study cannot tell it from zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

WITHIN_NOISE = "within noise"


def _t95(df: int) -> float:
    from scipy.stats import t  # lazy: scipy takes a moment, only the studies need it

    return float(t.ppf(0.975, df))


class Estimate(NamedTuple):
    """A figure over n seeds: the mean and the half-width of its 95% interval (None for n < 2)."""

    mean: float
    half: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Estimate:
        """The mean of `values` (one per seed) ± the Student-t 95% half-width of that mean."""
        xs = [float(v) for v in values]
        if not xs:
            raise ValueError("an estimate needs at least one value")
        n = len(xs)
        mean = math.fsum(xs) / n
        if n < 2:
            return cls(mean, None, n)
        sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
        return cls(mean, _t95(n - 1) * sd / math.sqrt(n), n)

    @property
    def within_noise(self) -> bool:
        """Whether the interval covers zero (always, with one seed: there is no interval)."""
        return self.half is None or abs(self.mean) <= self.half

    def fmt(self, spec: str = ".4f") -> str:
        """'0.1234 ± 0.0021' ('0.1234' with one seed)."""
        if self.half is None:
            return format(self.mean, spec)
        return f"{self.mean:{spec}} ± {self.half:{spec}}"

    def fmt_difference(self, spec: str = "+.4f") -> str:
        """A paired difference: '+0.1332 ± 0.0040', or '+0.0012 ± 0.0040 (within noise)'."""
        text = self.fmt(spec).replace("± +", "± ")
        return f"{text} ({WITHIN_NOISE})" if self.within_noise else text

    def as_json(self) -> dict:
        return {"mean": self.mean, "ci95": self.half, "n": self.n}
