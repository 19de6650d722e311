"""The reduced LSA's GD step fused into one pass over the prompts: C, compiled on first use.

`lsa.reduced_loss_grad` runs about ten torch operations over every chunk of prompts and reads the
chunk twice; at small d each is a few flops per number read, so the step is bound by passes over
memory and by per-operation cost, not by arithmetic. `fused_step.c` does the whole step, loss and
gradient, in one pass over tiles of prompts that stay in the L1 cache, vectorised by the compiler.

The C source is compiled by the system's C compiler (`$CC`, else `cc`) the first time a process
needs it, for the CPU it runs on (`-march=native`), and the library is cached under
`$ICL_STUDY_CACHE` (default `$XDG_CACHE_HOME/icl-study`, else `~/.cache/icl-study`), keyed by the
source, the flags, the compiler and the CPU, so that nodes of a cluster sharing a home directory
each get their own. Where no compiler works, or with `ICL_STUDY_FUSED=0`, training takes the torch
path; the two agree to rounding (tests compare them to 1e-12), and the trials table's `device`
column says which ran (`cpu+fused` or `cpu`).
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
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fused_step.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-shared", "-fPIC"]
# exp and log through the C library's vector variants (glibc's libmvec), where it has them
VECTOR_MATH = (["-DICL_MVEC"], ["-lmvec", "-lm"])
MAX_D, MAX_C = 32, 16  # as fused_step.c


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
    """The compiled kernel, or None where it is switched off or cannot be built."""
    if os.environ.get("ICL_STUDY_FUSED", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"fused_step-{key}.so"
    try:
        if not path.exists() and not _compile(cc, path):
            return None
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    lib.reduced_step.restype = ctypes.c_int
    lib.reduced_step.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long, *[ctypes.c_void_p] * 4, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def applies(V: torch.Tensor) -> bool:
    """Whether the fused step can run on statistics V [S, c', d, B] (prompts last)."""
    return V.device.type == "cpu" and V.dtype == torch.float64 and V.shape[2] <= MAX_D and V.shape[1] <= MAX_C and library() is not None


def loss_grad(W: torch.Tensor, V: torch.Tensor, xq: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """lsa.reduced_loss_grad over all the prompts in one pass (see `applies`).

    Shapes: W [S, d, d], V [S, c', d, B], xq [S, d, B] (contiguous), y [S, B] float64 (the class
    index for "ce", the target for "squared") -> summed loss [S], summed gradient [S, d, d].
    """
    S, c, d, B = V.shape
    if not (V.is_contiguous() and xq.is_contiguous() and y.is_contiguous() and y.dtype == torch.float64):
        raise ValueError("fused.loss_grad needs contiguous statistics, prompts last, and float64 labels")
    W = W.contiguous()
    out, grad = W.new_empty(S), torch.empty_like(W)
    bound = 2.0 if c == 1 else float(c)  # each prompt's term of the sum of logs lies in [1, bound]
    k = max(1, int(0.9 * math.log(torch.finfo(torch.float64).max) / math.log(bound)))
    done = library().reduced_step(S, d, c, B, W.data_ptr(), V.data_ptr(), xq.data_ptr(), y.data_ptr(), int(loss == "squared"), k, out.data_ptr(), grad.data_ptr())
    if done != 0:
        raise ValueError(f"fused.loss_grad: shapes beyond the kernel's (d <= {MAX_D}, c' <= {MAX_C}): d = {d}, c' = {c}")
    return out, grad
