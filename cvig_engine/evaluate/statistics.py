"""Statistics across trials: mean and sample standard deviation, Student's two-sample t-test."""
from __future__ import annotations

import math

import numpy as np

from cvig_engine.errors import CvigInputError

__all__ = ["mean_and_std", "two_sample_t_test"]


def mean_and_std(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator) of trial values.

    Returns ``(None, None)`` for no value and ``(value, None)`` for one.
    """
    values = np.asarray([value for value in values if value is not None], dtype=np.float64)
    if values.size == 0:
        return None, None
    if values.size == 1:
        return float(values[0]), None
    return float(values.mean()), float(values.std(ddof=1))


def two_sample_t_test(sample_a, sample_b) -> dict:
    """Student's two-sample t-test with equal variances (scipy's ``ttest_ind`` default), two-sided.

    t = (mean_a - mean_b) / sqrt(s_p^2 (1/n_a + 1/n_b)), with the pooled variance
    s_p^2 = ((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2) and n_a + n_b - 2 degrees of
    freedom; p = 2 P(T <= -|t|) from the t distribution's CDF.

    Returns:
        ``t_statistic``, ``degrees_of_freedom``, ``p_value`` (NaN when both samples are constant
        and equal, as scipy gives), ``mean_a``, ``mean_b``, ``n_a``, ``n_b``.

    Raises:
        CvigInputError: fewer than 3 values in all, or an empty sample (no degree of freedom).
    """
    from scipy.special import stdtr

    sample_a = np.asarray(sample_a, dtype=np.float64)
    sample_b = np.asarray(sample_b, dtype=np.float64)
    n_a, n_b = sample_a.size, sample_b.size
    if n_a < 1 or n_b < 1 or n_a + n_b < 3:
        raise CvigInputError(f"a two-sample t-test needs at least one trial in each configuration "
                             f"and three in all; got {n_a} and {n_b}")
    degrees_of_freedom = n_a + n_b - 2
    squares = ((sample_a - sample_a.mean()) ** 2).sum() + ((sample_b - sample_b.mean()) ** 2).sum()
    pooled_variance = squares / degrees_of_freedom
    difference = sample_a.mean() - sample_b.mean()
    standard_error = math.sqrt(pooled_variance * (1.0 / n_a + 1.0 / n_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        t_statistic = float(np.float64(difference) / np.float64(standard_error))
    p_value = float(2.0 * stdtr(degrees_of_freedom, -abs(t_statistic)))
    return {
        "t_statistic": t_statistic,
        "degrees_of_freedom": int(degrees_of_freedom),
        "p_value": p_value,
        "mean_a": float(sample_a.mean()),
        "mean_b": float(sample_b.mean()),
        "n_a": int(n_a),
        "n_b": int(n_b),
    }
