"""Noise floors: a figure over seeds is its mean ± a Student-t 95% interval, and a paired
difference whose interval covers zero reads "within noise"."""

import numpy as np
import pytest
from scipy import stats

from saekit.measure.noise import Estimate


def test_the_interval_is_scipys_student_t_interval():
    xs = [0.512, 0.498, 0.531, 0.505]
    e = Estimate.of(xs)
    lo, hi = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert e.n == 4 and e.mean == pytest.approx(np.mean(xs), abs=1e-15)
    assert (e.mean - e.half, e.mean + e.half) == pytest.approx((lo, hi), abs=1e-12)
    assert e.fmt() == f"{np.mean(xs):.4f} ± {(hi - lo) / 2:.4f}"


def test_a_difference_inside_its_interval_is_within_noise():
    clear = Estimate.of([0.13, 0.14, 0.12])
    noisy = Estimate.of([0.004, -0.003, 0.002])
    assert not clear.within_noise and clear.fmt_difference() == "+0.1300 ± 0.0248"
    assert noisy.within_noise and noisy.fmt_difference().endswith("(within noise)")
    assert Estimate.of([-0.02, -0.021, -0.019]).fmt_difference().startswith("-0.0200 ± 0.0025")


def test_one_seed_has_no_interval_and_claims_no_difference():
    e = Estimate.of([0.25])
    assert e.half is None and e.fmt() == "0.2500" and e.within_noise
    assert e.as_json() == {"mean": 0.25, "ci95": None, "n": 1}
    with pytest.raises(ValueError):
        Estimate.of([])
