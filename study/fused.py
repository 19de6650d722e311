"""Passes over prompts fused into one loop each, in C (`fused.c`), compiled on first use.

- `reduced_step`, `full_step`: the reduced and the full LSA's GD step. `lsa.reduced_loss_grad`
  runs about ten torch operations over every chunk of prompts and reads the chunk twice; at small d
  each does a few flops per number it reads, so the step is bound by passes over memory and by the
  cost per operation. The kernel does the whole step, loss and gradient, in one pass over tiles of
  prompts that stay in L1 (the full form's Gram matrices: in L2, for their second use).
- `logreg_newton`: `classifiers.logreg`'s Newton fits, one context after another, each step one pass
  over the context's examples (logits, softmax, gradient and Hessian sums) and a Cholesky solve.
- `em_fit`: `em.fit`'s EM, one context after another with its restarts together, each iteration one
  pass over the examples per restart (E-step and the M-step's sums) and a d x d solve per component.

The C source is compiled by the system's C compiler (`$CC`, else `cc`) the first time a process
needs it (about 2 s), for the CPU it runs on (`-march=native`), and the library is cached under
`$ICL_STUDY_CACHE` (default `$XDG_CACHE_HOME/icl-study`, else `~/.cache/icl-study`), keyed by the
source, the flags, the compiler and the CPU, so that nodes of a cluster sharing a home directory
each get their own. Where no compiler works, or with `ICL_STUDY_FUSED=0`, the torch code runs; the
two agree to rounding (tests/test_fused.py), and the trials table's `device` column says which ran
(`cpu+fused` or `cpu`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fused.c")
# -O2 with the vectoriser: as fast as -O3 here, built in 2 s instead of 7; no -ffast-math: non-finite
# values must propagate; not trapping lets compares of doubles vectorise
FLAGS = ["-O2", "-ftree-vectorize", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
# exp and log through the C library's vector variants (glibc's libmvec), where it has them
VECTOR_MATH = (["-DICL_MVEC"], ["-lmvec", "-lm"])
MAX_D, MAX_C = 32, 16  # the GD step's d and c', as fused.c
FULL_MAX_D = 48  # the full step's D = d + c'
LOGREG_MAX_D, LOGREG_MAX_C = 16, 8  # logreg_newton's d and c
EM_MAX_D, EM_MAX_K = 16, 8  # em_fit's d and K


def _cpu() -> str:
    """The CPU's identity for the cache key: its model and instruction-set flags where Linux says."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in info if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    if root := os.environ.get("ICL_STUDY_CACHE"):
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "icl-study"


def _compile(cc: str, out: Path) -> bool:
    """Compile the source into `out` atomically, with vector math if the C library links it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for define, link in (VECTOR_MATH, ([], ["-lm"])):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, *define, str(SOURCE), "-o", tmp, *link], capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, out)  # concurrent workers each compile; the last rename wins, whole
                return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return False


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they are switched off or cannot be built."""
    if os.environ.get("ICL_STUDY_FUSED", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"fused-{key}.so"
    try:
        if not path.exists() and not _compile(cc, path):
            return None
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    i, n, f64, ptr = ctypes.c_int, ctypes.c_long, ctypes.c_double, ctypes.c_void_p
    signatures = {  # as fused.c declares them; each returns an int (status, or EM's iterations)
        "reduced_step": [i, i, i, n, ptr, ptr, ptr, ptr, i, i, ptr, ptr],
        "full_step": [i, i, i, i, n, ptr, ptr, ptr, ptr, ptr, i, i, ptr, ptr, ptr],
        "logreg_newton": [i, i, i, n, ptr, ptr, f64, f64, i, ptr, ptr, ptr],
        "em_fit": [i, i, i, i, n, ptr, ptr, ptr, f64, i, f64, f64, f64, ptr, ptr, ptr, ptr, ptr],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = i, args
    return lib


def _logs_per_product(c: int) -> int:
    """Factors per log in the cross-entropy's sum of logs (lsa._sum_log): each lies in [1, 2] (binary) or [1, c']."""
    bound = 2.0 if c == 1 else float(c)
    return max(1, int(0.9 * math.log(torch.finfo(torch.float64).max) / math.log(bound)))


def _plain(*ts: torch.Tensor) -> bool:
    """float64 CPU tensors outside autograd: what the kernels read."""
    return all(t.device.type == "cpu" and t.dtype == torch.float64 and not t.requires_grad for t in ts)


def _shaped(kernel: str, **named: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """Every tensor a kernel reads, checked against the shape the kernel reads it with (float64, on
    the CPU): the C code takes its sizes from one tensor and walks the others by them."""
    for name, (t, shape) in named.items():
        if t.dtype != torch.float64 or t.device.type != "cpu" or tuple(t.shape) != tuple(shape):
            raise ValueError(f"fused.{kernel}: {name} must be a float64 CPU tensor of shape {list(shape)}, got {t.dtype} on {t.device.type}, shape {list(t.shape)}")


def reduced_applies(W: torch.Tensor, V: torch.Tensor) -> bool:
    """Whether `reduced_step` can run on W [S, d, d] and statistics V [S, c', d, B] (prompts last)."""
    return _plain(W, V) and V.shape[2] <= MAX_D and V.shape[1] <= MAX_C and library() is not None


def _parts(n: int, call) -> list[int]:
    """call(lo, hi) on contiguous ranges of n members or prompts, one per torch thread, at once.

    The kernels are single-threaded and each member or prompt is computed alone, so the ranges give
    the same numbers whatever the thread count; ctypes releases the GIL for each call.
    """
    k = max(1, min(torch.get_num_threads(), n))
    cuts = [n * i // k for i in range(k + 1)]
    ranges = [(lo, hi) for lo, hi in zip(cuts, cuts[1:]) if hi > lo] or [(0, n)]
    if len(ranges) == 1:
        return [call(*ranges[0])]
    return list(_pool(len(ranges)).map(lambda r: call(*r), ranges))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count for the life of the process: a GD step calls the kernel every step."""
    return ThreadPoolExecutor(threads, thread_name_prefix="icl-fused")


def reduced_step(W: torch.Tensor, V: torch.Tensor, xq: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """lsa.reduced_loss_grad over all the prompts in one pass (see `reduced_applies`).

    Shapes: W [S, d, d], V [S, c', d, B], xq [S, d, B] (contiguous), y [S, B] float64 (the class
    index for "ce", the target for "squared") -> summed loss [S], summed gradient [S, d, d].
    """
    S, c, d, B = V.shape
    _shaped("reduced_step", W=(W, (S, d, d)), V=(V, (S, c, d, B)), xq=(xq, (S, d, B)), y=(y, (S, B)))
    if not (V.is_contiguous() and xq.is_contiguous() and y.is_contiguous()):
        raise ValueError("fused.reduced_step needs contiguous statistics, prompts last")
    W = W.contiguous()
    out, grad = W.new_empty(S), torch.empty_like(W)
    squared, k = int(loss == "squared"), _logs_per_product(c)

    def call(lo: int, hi: int) -> int:
        ins = [t[lo:hi].data_ptr() for t in (W, V, xq, y)]
        return library().reduced_step(hi - lo, d, c, B, *ins, squared, k, out[lo:hi].data_ptr(), grad[lo:hi].data_ptr())

    if any(_parts(S, call)):
        raise ValueError(f"fused.reduced_step: shapes beyond the kernel's (d <= {MAX_D}, c' <= {MAX_C}; c' = 1 for the squared loss): d = {d}, c' = {c}, loss {loss}")
    return out, grad


def full_applies(P: torch.Tensor, G: torch.Tensor) -> bool:
    """Whether `full_step` can run on P [S, c', D] and Gram matrices G [S, D, D, B] (prompts last)."""
    return _plain(P, G) and G.shape[1] <= FULL_MAX_D and P.shape[1] <= MAX_C and library() is not None


def full_step(P: torch.Tensor, K: torch.Tensor, G: torch.Tensor, xq: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lsa.full_loss_grad over all the prompts in one pass (see `full_applies`).

    Shapes: P [S, c', D], K [S, D, d], G [S, D, D, B], xq [S, d, B] (contiguous), y [S, B] float64
    -> summed loss [S], dP [S, c', D], dK [S, D, d].
    """
    S, c, D = P.shape
    d, B = xq.shape[1], xq.shape[2]
    _shaped("full_step", P=(P, (S, c, D)), K=(K, (S, D, d)), G=(G, (S, D, D, B)), xq=(xq, (S, d, B)), y=(y, (S, B)))
    if not (G.is_contiguous() and xq.is_contiguous() and y.is_contiguous()):
        raise ValueError("fused.full_step needs contiguous statistics, prompts last")
    P, K = P.contiguous(), K.contiguous()
    out, dP, dK = P.new_empty(S), torch.empty_like(P), torch.empty_like(K)
    squared, k = int(loss == "squared"), _logs_per_product(c)

    def call(lo: int, hi: int) -> int:
        ins = [t[lo:hi].data_ptr() for t in (P, K, G, xq, y)]
        return library().full_step(hi - lo, d, c, D, B, *ins, squared, k, out[lo:hi].data_ptr(), dP[lo:hi].data_ptr(), dK[lo:hi].data_ptr())

    if any(_parts(S, call)):
        raise ValueError(f"fused.full_step: shapes beyond the kernel's (d <= D <= {FULL_MAX_D}, c' <= {MAX_C}; c' = 1 for the squared loss): D = {D}, c' = {c}, loss {loss}")
    return out, dP, dK


def logreg_applies(x: torch.Tensor, c: int) -> bool:
    """Whether `logreg_newton` can fit contexts x [P, M, d] with c classes."""
    return _plain(x) and x.shape[2] <= LOGREG_MAX_D and 2 <= c <= LOGREG_MAX_C and library() is not None


def logreg_newton(x: torch.Tensor, y: torch.Tensor, c: int, l2: float, tol: float, max_steps: int) -> torch.Tensor:
    """Newton's method from w = 0 on each context, as `classifiers.logreg_fit` (see `logreg_applies`).

    Each prompt stops after its first step with max |step| < tol (that step applied) or after
    max_steps; a prompt whose Hessian is not positive definite (non-finite data) gets NaN weights.
    Shapes: x [P, M, d], y [P, M] class index -> w [P, c, d+1] (intercept last).
    """
    P, M, d = x.shape
    yd = y.to(torch.float64).contiguous()
    _shaped("logreg_newton", x=(x, (P, M, d)), y=(yd, (P, M)))
    xt = x.transpose(1, 2).contiguous()  # examples last
    w = x.new_empty(P, c, d + 1)
    steps = torch.empty(P, dtype=torch.int32)

    def call(lo: int, hi: int) -> int:
        work = x.new_empty((d + 1) * (d + 2) // 2 * M)  # one context's products f_i f_j
        ins = [t[lo:hi].data_ptr() for t in (xt, yd)]
        return library().logreg_newton(hi - lo, d, c, M, *ins, l2, tol, max_steps, w[lo:hi].data_ptr(), steps[lo:hi].data_ptr(), work.data_ptr())

    if any(_parts(P, call)):
        raise ValueError(f"fused.logreg_newton: shapes beyond the kernel's (d <= {LOGREG_MAX_D}, 2 <= c <= {LOGREG_MAX_C}): d = {d}, c = {c}")
    return w.masked_fill_((steps < 0)[:, None, None], math.nan)


def em_applies(x: torch.Tensor, K: int) -> bool:
    """Whether `em_fit` can fit contexts x [P, M, d] with K components."""
    return _plain(x) and x.shape[2] <= EM_MAX_D and 1 <= K <= EM_MAX_K and x.shape[1] >= 1 and library() is not None


def em_fit(x: torch.Tensor, y: torch.Tensor, beta0: torch.Tensor, sigma: float | None, iters: int, tol: float, ridge: float, sigma_floor: float) -> tuple[torch.Tensor, ...]:
    """EM on each context from the starts beta0, as `em.fit` with grad_steps = 0 (see `em_applies`).

    Shapes: x [P, M, d], y [P, M], beta0 [P, R, K, d] -> beta [P, K, d], pi [P, K], sigma [P],
    loglik [P] of the best restart, and the most iterations any prompt ran.
    """
    P, M, d = x.shape
    R, K = beta0.shape[1], beta0.shape[2]
    T = d * (d + 1) // 2
    y, beta0 = y.to(torch.float64).contiguous(), beta0.to(torch.float64).contiguous()
    _shaped("em_fit", x=(x, (P, M, d)), y=(y, (P, M)), beta0=(beta0, (P, R, K, d)))
    xt = x.transpose(1, 2).contiguous()  # examples last
    beta, pi, sig, loglik = x.new_empty(P, K, d), x.new_empty(P, K), x.new_empty(P), x.new_empty(P)
    known = -1.0 if sigma is None else float(sigma)

    def call(lo: int, hi: int) -> int:
        work = x.new_empty(T * M + R * (K * d + K + 2 + K * (1 + T + d)))  # see fused.c
        ins = [t[lo:hi].data_ptr() for t in (xt, y, beta0)]
        outs = [t[lo:hi].data_ptr() for t in (beta, pi, sig, loglik)]
        return library().em_fit(hi - lo, d, K, R, M, *ins, known, iters, tol, ridge, sigma_floor, *outs, work.data_ptr())

    its = _parts(P, call)
    if min(its) < 0:
        raise ValueError(f"fused.em_fit: shapes beyond the kernel's (d <= {EM_MAX_D}, K <= {EM_MAX_K}, M >= 1): d = {d}, K = {K}, M = {M}")
    return beta, pi, sig, loglik, max(its)
