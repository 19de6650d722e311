"""The laws the analysis fits (theory.md section 5): pure numpy functions, no fitting here."""

from __future__ import annotations

import numpy as np


def power_law(x: np.ndarray, log_a: float, b: float) -> np.ndarray:
    """y = exp(log_a) x^b, i.e. log y = log_a + b log x."""
    return np.exp(log_a) * np.asarray(x, dtype=float) ** b


def corrected_power_law(x: np.ndarray, log_a: float, b: float, c: float, gamma: float = 1.0) -> np.ndarray:
    """y = exp(log_a) x^b (1 + c x^-gamma): a power law with its first correction (how a bound is judged)."""
    x = np.asarray(x, dtype=float)
    return np.exp(log_a) * x**b * (1 + c * x**-gamma)


def linear_rate(t: np.ndarray, log_a: float, rho: float) -> np.ndarray:
    """y = exp(log_a) rho^t: linear (geometric) convergence at contraction rho per step."""
    return np.exp(log_a + np.asarray(t, dtype=float) * np.log(rho))
