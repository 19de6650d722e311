"""Covariance specs shared by the task families: identity, diag(kappa), rotated(kappa)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from study.rng import generator


@dataclass(frozen=True)
class Covariance:
    """An SPD matrix with its symmetric square root and inverse, all float64 on the CPU.

    Shapes: lam, half, inv: [d, d].
    """

    lam: torch.Tensor
    half: torch.Tensor
    inv: torch.Tensor

    def to(self, device: torch.device | str) -> Covariance:
        return Covariance(self.lam.to(device), self.half.to(device), self.inv.to(device))


def spectrum(d: int, kappa: float) -> torch.Tensor:
    """Eigenvalues log-spaced from 1 to kappa, rescaled to trace d.  Shapes: [d]."""
    if d == 1:
        return torch.ones(1, dtype=torch.float64)
    ev = torch.logspace(0.0, math.log10(kappa), d, dtype=torch.float64)
    return ev * (d / ev.sum())


def rotation(d: int, cov_seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix drawn from the configuration's covariance seed."""
    g = generator({"rotation": d, "cov_seed": cov_seed}, "task")
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # sign fix makes the QR factor Haar-distributed


def covariance(spec: str, d: int, kappa: float = 1.0, cov_seed: int = 0) -> Covariance:
    """Build the covariance of a spec; `rotated` shares its rotation across every task and run."""
    if spec == "identity":
        eye = torch.eye(d, dtype=torch.float64)
        return Covariance(eye, eye.clone(), eye.clone())
    ev = spectrum(d, kappa)
    if spec == "diag":
        return Covariance(torch.diag(ev), torch.diag(ev.sqrt()), torch.diag(1.0 / ev))
    if spec == "rotated":
        q = rotation(d, cov_seed)
        return Covariance(q @ torch.diag(ev) @ q.T, q @ torch.diag(ev.sqrt()) @ q.T, q @ torch.diag(1.0 / ev) @ q.T)
    raise ValueError(f"unknown covariance spec {spec!r}; known: diag, identity, rotated")
