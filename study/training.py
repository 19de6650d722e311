"""Full-batch gradient descent on the LSA, vectorised over the members of a bundle.

A member is one (configuration, seed); members that share shapes (d, c, B, param) train as one
stack, each with its own data, step size and covariance. `train` is one plain loop around a pure
step function; it records the curve every `log_every` steps and then measures each logged point
against the empirical optimum (Newton for `reduced`; for `full`, whose loss is not convex, GD run
on for `REFERENCE_FACTOR` times as many steps). A member whose loss turns non-finite is
`diverged` at that step; the others go on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from study import fused, lsa
from study.optimum import empirical_optimum, local_rate, quadratic_subopt

REFERENCE_FACTOR = 10  # full param: the reference optimum is GD run on to 10x the steps
REFERENCE_GTOL = 1e-6  # full param: the reference counts as converged below this gradient norm
CHUNK_BYTES = 4 << 20  # a chunk's share of the prompt statistics on the CPU (benchmarks/roofline.py)
MIN_CHUNK = 512  # prompts


@dataclass
class TrainStats:
    """Per-prompt sufficient statistics of the training prompts.

    Shapes: V [B, c', d] = (1/N) sum_i ytil_i x_i^T; gram [B, d+c', d+c'] = Z Z^T / N (query
    column included) or None; xq [B, d]; yq [B].
    """

    V: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    gram: torch.Tensor | None


def _prompts_last(t: torch.Tensor) -> torch.Tensor:
    """t [S, B, ...] as a view of memory laid out [S, ..., B] (no copy if it already is)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


@dataclass
class Problem:
    """A stack of S training problems.

    Shapes: V [S, B, c', d], xq [S, B, d], yq [S, B], gram [S, B, D, D] or None, lr [S],
    target [S, d, d]: the theory's W / scale (gmm: Lam^-1 with scale c'' = 2 binary, c otherwise;
    mor: Gamma*^T with scale 1); `loss` names one of `lsa.LOSSES`.
    """

    V: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    gram: torch.Tensor | None
    lr: torch.Tensor
    target: torch.Tensor
    scale: float
    loss: str = "ce"

    def __post_init__(self):
        # stored prompts last (the fields keep their shapes as views): see lsa's training kernels
        self.V, self.xq = _prompts_last(self.V), _prompts_last(self.xq)
        self.gram = None if self.gram is None else _prompts_last(self.gram)

    @property
    def S(self) -> int:
        return self.V.shape[0]

    @functools.cached_property
    def labels(self) -> torch.Tensor:
        """yq as float64 (the class index or the target), as the fused step reads it.  Shapes: [S, B]."""
        return self.yq.to(torch.float64).contiguous()

    @property
    def B(self) -> int:
        return self.V.shape[1]

    @property
    def d(self) -> int:
        return self.xq.shape[-1]


@dataclass
class Curves:
    """Shapes: every tensor [T, S] over the logged steps (T = 0 when no GD ran)."""

    steps: list[int]
    train_loss: torch.Tensor
    subopt: torch.Tensor
    dist_opt: torch.Tensor
    dist_theory: torch.Tensor
    subopt_theory: torch.Tensor  # the predicted loss gap (quadratic loss, reduced); NaN otherwise


@dataclass
class TrainResult:
    """Per-member outcome.  Shapes: [S] tensors; params name -> [S, ...]."""

    curves: Curves
    params: dict[str, torch.Tensor]
    diverged_at: torch.Tensor  # first step with a non-finite loss, -1 if none
    final_loss: torch.Tensor
    final_dist_theory: torch.Tensor  # ||W_final / scale - target||_max
    opt_loss: torch.Tensor
    opt_converged: torch.Tensor
    opt_dist_theory: torch.Tensor  # ||W_opt / scale - target||_max
    opt_g: torch.Tensor  # <W_opt / scale, target> / ||target||_F^2 - 1: the signed size of G (theory.md section 5)
    opt_noise: torch.Tensor  # ||W_opt / scale - (1 + opt_g) target||_F / ||target||_F: the part off the target's line
    rho_theory: torch.Tensor  # max_i |1 - lr lambda_i(H)| at the optimum (reduced only)
    opt_params: dict[str, torch.Tensor] = field(default_factory=dict)


def init_params(prob: Problem, param: str, init_scale: float = 0.0, gen: list[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """W = 0 (reduced); for full, the Zhang-Frei-Bartlett initialisation with scale s0 = init_scale,

    W_PV = s0 [[0,0],[0,I]], W_KQ = s0 [[Theta Theta^T / ||Theta Theta^T||_F, 0],[0,0]] (Theta Gaussian,
    one per run from its `init` stream), or, with init_scale = 0, the block structure at the
    reduced model's W = 0 (W_PV = [[0,0],[0,I]], W_KQ = 0).
    """
    S, d, dt, dev = prob.S, prob.d, prob.V.dtype, prob.V.device
    if param == "reduced":
        return {"W": torch.zeros(S, d, d, dtype=dt, device=dev)}
    W_PV, W_KQ = lsa.block_init(d, prob.V.shape[2], S, dtype=dt)
    if init_scale > 0:
        theta = torch.stack([torch.randn(d, d, generator=g, dtype=torch.float64) for g in gen])
        tt = theta @ theta.transpose(1, 2)
        W_PV = init_scale * W_PV
        W_KQ[:, :d, :d] = init_scale * (tt / tt.flatten(1).norm(dim=1)[:, None, None]).to(dt)
    return {"W_PV": W_PV.to(dev), "W_KQ": W_KQ.to(dev)}


def _chunks(prob: Problem, width: int) -> list[slice]:
    """Equal chunks of prompts on the CPU: their statistics (`width` numbers a prompt and member)
    fill about CHUNK_BYTES, so the step's second read comes from cache, but never fewer than
    MIN_CHUNK prompts, so each operation stays long enough to amortise its fixed cost (wide
    statistics, such as the full form's Gram matrices at d = 16, then read memory twice). One
    chunk on a GPU."""
    B = prob.B
    if prob.V.device.type != "cpu":
        return [slice(0, B)]
    b = max(MIN_CHUNK, CHUNK_BYTES // (prob.S * width * prob.V.element_size()))
    n = -(-B // b)
    b = -(-B // n)
    return [slice(s, s + b) for s in range(0, B, b)]


def step(params: dict[str, torch.Tensor], prob: Problem) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss at `params` [S] and its gradient; pure."""
    B, d = prob.B, prob.d
    loss = prob.V.new_zeros(prob.S)
    xq = prob.xq.transpose(1, 2)  # [S, d, B], contiguous
    if "W" in params:
        W = params["W"]
        V = prob.V.permute(0, 2, 3, 1)  # [S, c', d, B], contiguous
        if fused.reduced_applies(W, V):
            loss, grad = fused.reduced_step(W, V, xq, prob.labels, prob.loss)
            return loss / B, {"W": grad / B}
        grad = torch.zeros_like(W)
        for c in _chunks(prob, (V.shape[1] + 1) * d):
            ls, g = lsa.reduced_loss_grad(W, V[..., c], xq[..., c], prob.yq[:, c], prob.loss)
            loss += ls
            grad += g
        return loss / B, {"W": grad / B}
    P, K = params["W_PV"][:, d:, :], params["W_KQ"][:, :, :d]
    G = prob.gram.permute(0, 2, 3, 1)  # [S, D, D, B], contiguous
    if fused.full_applies(P, G):
        loss, dP, dK = fused.full_step(P, K, G, xq, prob.labels, prob.loss)
    else:
        dP, dK = torch.zeros_like(P), torch.zeros_like(K)
        for c in _chunks(prob, G.shape[1] ** 2 + d):
            ls, gP, gK = lsa.full_loss_grad(P, K, G[..., c], xq[..., c], prob.yq[:, c], prob.loss)
            loss += ls
            dP += gP
            dK += gK
    gPV, gKQ = torch.zeros_like(params["W_PV"]), torch.zeros_like(params["W_KQ"])
    gPV[:, d:, :], gKQ[:, :, :d] = dP / B, dK / B
    return loss / B, {"W_PV": gPV, "W_KQ": gKQ}


def gd(params: dict[str, torch.Tensor], prob: Problem, steps: int, log_every: int | None = None):
    """Run `steps` GD steps; returns final params, first non-finite step [S], and the log.

    The log holds (step, loss [S], params) at every multiple of log_every and at the end.
    """
    lr = prob.lr[:, None, None]
    diverged_at = torch.full((prob.S,), -1, dtype=torch.long, device=prob.V.device)
    log = []
    for t in range(steps + 1):
        loss, grad = step(params, prob)
        newly = (~torch.isfinite(loss)) & (diverged_at < 0)
        diverged_at = torch.where(newly, torch.full_like(diverged_at, t), diverged_at)
        if log_every and (t % log_every == 0 or t == steps):
            log.append((t, loss.detach().clone(), {k: v.clone() for k, v in params.items()}))
            if bool((diverged_at >= 0).all()):
                break
        if t < steps:
            params = {k: v - lr * grad[k] for k, v in params.items()}
    return params, diverged_at, log


def _played_W(params: dict[str, torch.Tensor], d: int) -> torch.Tensor:
    """The W a parameter set plays in the reduced model: W itself, or the full form's (lsa.effective_W)."""
    return params["W"] if "W" in params else lsa.effective_W(params["W_PV"], params["W_KQ"], d)


def _dist(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(((a[k] - b[k]) ** 2).flatten(1).sum(1) for k in a))


def _theory_gap(W: torch.Tensor, prob: Problem) -> torch.Tensor:
    return (W / prob.scale - prob.target).abs().flatten(1).amax(1)


def projection(W: torch.Tensor, prob: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed projection g = <W/scale, T> / ||T||_F^2 - 1 of W on the target T, and the relative
    residual ||W/scale - (1 + g) T||_F / ||T||_F (NaN where T = 0).  Shapes: W [S, d, d] -> [S], [S].

    By the O(d) invariance of the whitened gmm problem the population minimiser is exactly a multiple
    of Lam^-1, so g measures G and the residual is the finite-B sampling noise alone.
    """
    A, T = (W / prob.scale).double(), prob.target.double()
    a = lsa.line_coefficient(A, T)
    resid = (A - a[:, None, None] * T).flatten(1).norm(dim=1) / T.flatten(1).norm(dim=1)
    return a - 1, resid


def train(prob: Problem, param: str, steps: int, log_every: int, init: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train every member of the stack and measure its curve against the empirical optimum.

    steps = 0 (reduced only) runs no GD: the result is the empirical minimiser, with no curve.
    """
    params = init if init is not None else init_params(prob, param)
    start = params
    S = prob.S
    if steps > 0:
        params, diverged_at, log = gd(params, prob, steps, log_every)
        # GD with a stable step never ends above its starting loss; a run that does is unstable even
        # when its loss stays finite (the CE gradient is bounded, so W only grows linearly)
        logged = torch.stack([loss for _, loss, _ in log])  # [T, S]
        above = logged > logged[0]
        unstable = above[-1] & (diverged_at < 0)
        logged_steps = torch.tensor([t for t, _, _ in log], device=diverged_at.device)
        diverged_at = torch.where(unstable, logged_steps[above.to(torch.uint8).argmax(0)], diverged_at)
    else:
        if param != "reduced":
            raise ValueError("steps = 0 (the minimiser alone) needs param reduced")
        diverged_at = torch.full((S,), -1, dtype=torch.long, device=prob.V.device)
        log, logged = [], prob.V.new_zeros(0, S)

    nan = torch.full((S,), float("nan"), dtype=torch.float64)
    rho, opt_conv = nan.clone(), torch.zeros(S, dtype=torch.bool)
    predicted = torch.full((len(log), S), float("nan"), dtype=torch.float64)
    if param == "reduced":
        opts = []
        # Newton starts at the trained W, or with no GD at the theory's W (closer than 0: fewer iterations)
        W0 = params["W"] if steps > 0 else prob.scale * prob.target
        for s in range(S):
            o = empirical_optimum(prob.V[s], prob.xq[s], prob.yq[s], W0[s], prob.loss)
            opts.append(o)
            rho[s] = local_rate(o.hess_eigs, float(prob.lr[s]))
            opt_conv[s] = o.converged
            if prob.loss == "squared" and log:  # quadratic: the whole curve follows from the Hessian and the start
                e0 = start["W"][s].double().cpu() - o.W.cpu()
                predicted[:, s] = quadratic_subopt(o.hess.cpu(), e0, float(prob.lr[s]), [t for t, _, _ in log])
        opt_params = {"W": torch.stack([o.W for o in opts]).to(prob.V.dtype)}
        opt_loss = torch.tensor([o.loss for o in opts], dtype=torch.float64)
        if steps == 0:
            params = {k: v.clone() for k, v in opt_params.items()}
    else:
        opt_params, _, ref_log = gd(params, prob, (REFERENCE_FACTOR - 1) * steps, log_every=(REFERENCE_FACTOR - 1) * steps)
        opt_loss = ref_log[-1][1].double().cpu()
        # converged: GD has come to rest, its gradient small against the loss
        _, grad = step(opt_params, prob)
        gnorm = torch.sqrt(sum((g**2).flatten(1).sum(1) for g in grad.values())).double().cpu()
        opt_conv = torch.isfinite(opt_loss) & (gnorm < REFERENCE_GTOL * (1 + opt_loss.abs()))
    final_loss = log[-1][1].double().cpu() if log else opt_loss.clone()
    opt_loss = torch.where(opt_conv, opt_loss, nan)
    ref_ok = opt_conv.to(prob.V.device)

    losses = logged.double()
    subopt = losses - opt_loss.to(losses.device)
    empty = losses.new_zeros(0, S)
    dist_opt = torch.stack([_dist(p, opt_params) for _, _, p in log]).double() if log else empty
    dist_opt = torch.where(ref_ok, dist_opt, torch.nan)
    dist_theory = torch.stack([_theory_gap(_played_W(p, prob.d), prob) for _, _, p in log]).double() if log else empty
    curves = Curves([t for t, _, _ in log], losses.cpu(), subopt.cpu(), dist_opt.cpu(), dist_theory.cpu(), predicted)
    W_opt = _played_W(opt_params, prob.d)
    opt_g, opt_noise = projection(W_opt, prob)
    return TrainResult(
        curves=curves,
        params={k: v.double().cpu() for k, v in params.items()},
        diverged_at=diverged_at.cpu(),
        final_loss=final_loss,
        final_dist_theory=_theory_gap(_played_W(params, prob.d), prob).double().cpu(),
        opt_loss=opt_loss,
        opt_converged=opt_conv,
        opt_dist_theory=_theory_gap(W_opt, prob).double().cpu(),
        opt_g=opt_g.cpu(),
        opt_noise=opt_noise.cpu(),
        rho_theory=rho,
        opt_params={k: v.double().cpu() for k, v in opt_params.items()},
    )
