"""Standard errors of the ELBO's Monte Carlo estimate (`likelihood.score_answers_and_draws`).

An example's estimate is the mean of mc_num draws taken in R = mc_num / b rounds of b rows. The rows
of one round are not independent: they sweep the masking level l stratified over 1..L from one
random start, which is what makes the estimator low-variance. The rounds are independent and
identically distributed (each draws from its own fold_in(key, r)), so

  SE = std(round means, ddof=1) / sqrt(R)              (method "rounds", R >= 2)

is the standard error of the design as run: the stratification is accounted for, and its square is
unbiased for the estimator's variance. With a single round there is nothing to compare it with, and

  SE = std(all draws, ddof=1) / sqrt(mc_num)           (method "iid", R = 1)

is the approximation that treats the draws as independent; it ignores the stratification, which
usually (not always: a systematic sweep can meet a periodic integrand) makes it an overestimate.
With a single draw (mc_num = 1) there is no estimate: NaN. A one-token answer is scored exactly
(every draw the same): SE 0.

The ELBO is a bound on log p: the SE measures only the Monte Carlo noise around the bound.
"""

from __future__ import annotations

import math

import numpy as np

ROUNDS, IID = "rounds", "iid"


def method(n_rounds: int) -> str:
  """How `standard_error` treats draws in `n_rounds` rounds."""
  return ROUNDS if n_rounds >= 2 else IID


def standard_error(draws: np.ndarray) -> np.ndarray:
  """Float64 standard errors [N] of the means of `draws` [N, rounds, rows] (per example, the mean
  of all its draws, which `score_answers` returns)."""
  draws = np.asarray(draws, np.float64)
  n, rounds, rows = draws.shape
  if rounds * rows < 2:
    return np.full((n,), np.nan)
  if method(rounds) == ROUNDS:
    return draws.mean(axis=2).std(axis=1, ddof=1) / math.sqrt(rounds)
  return draws.reshape(n, -1).std(axis=1, ddof=1) / math.sqrt(rows)


def combined(se: np.ndarray, weights: np.ndarray | float = 1.0) -> float:
  """SE of sum_i weights_i x_i for independent estimates x_i with standard errors `se`."""
  return float(math.sqrt(np.sum((np.asarray(weights, np.float64) * np.asarray(se, np.float64)) ** 2)))


def as_field(value: float) -> float | None:
  """A standard error as JSON: None where it cannot be estimated (NaN is not JSON)."""
  return None if not math.isfinite(value) else float(value)
