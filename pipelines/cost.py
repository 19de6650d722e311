"""What a run costs: a flop count from its configuration, and seconds from a calibration.

`flops(run)` is a rough count of the floating-point work of training, the optimum and the
evaluation. Counts alone do not give seconds: a 2-core CPU runs small kernels far below its peak,
a GPU far below its own. `calibrate(device)` times a few small bundles of each family on that
device and fits, per kind of work, seconds = a * runs + b * flops (a fixed cost per run, a cost
per flop); `Calibration.seconds(run)` applies it. A kind is a family for the LSA (its training and
all its estimators) and family/model for another model (its training and evaluation alone: its
runs' baselines are priced at the family's rate), since a transformer's dense float32 products
and an LSA's statistics run at different fractions of a machine's peak. Calibrations are cached per device kind, thread
count and code version in `$XDG_CACHE_HOME/icl-study/calibration.json` (or `~/.cache/...`), so
`plan` answers in seconds and can show every device kind it has calibrated, including ones of
other machines whose cache file was copied in. `run` never calibrates: it uses the newest cached
calibration of its device kind, or NOMINAL.

The planner packs runs into Ray trials by these estimates (`pipelines.sweep.Sweep.bundles`) and
the progress line's ETA scales by them, so only their ratios need be right within a family.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.location import write_atomic
from study.config import Run, TrialConfig

CALIBRATION_FORMAT = 2  # 2: kinds per model (gmm/transformer, ...)


def flops(run: Run) -> float:
    """A rough count of the floating-point work of one run (training, optimum, evaluation)."""
    cfg = run.config
    if cfg.config_id not in _FLOPS:
        _FLOPS[cfg.config_id] = _flops(cfg)
    return _FLOPS[cfg.config_id]


_FLOPS: dict[str, float] = {}  # by config id: a plan asks for each run's count several times


def _flops(cfg: TrialConfig) -> float:
    """The model's training and evaluation (its config class's `flops`), and the baselines'."""
    return float(cfg.model.flops(cfg) + shared_flops(cfg))


def shared_flops(cfg: TrialConfig) -> float:
    """The part of `flops` that the configuration's baselines take (logistic regression, EM): runs
    that share their evaluation prompts pay it once per process (`study.trial.SHARED_ROWS`)."""
    if cfg.config_id not in _SHARED:
        t, ev = cfg.task, cfg.eval
        d, per_prompt = t.d, 0.0
        if "logreg" in cfg.estimators:
            k = t.c * (d + 1)
            per_prompt += sum(10 * m * k * k for m in ev.finite_M)
        for name in ("em", "gradient_em"):
            if name in cfg.estimators:
                per_prompt += sum(4 * ev.em_iters * ev.em_restarts * t.K * m * d * d for m in ev.finite_M)
        _SHARED[cfg.config_id] = float((1 + len(ev.shifts)) * ev.n_eval * per_prompt)  # every shift has its own prompts
    return _SHARED[cfg.config_id]


_SHARED: dict[str, float] = {}


def run_bytes(cfg: TrialConfig) -> int:
    """Memory of one run's training tensors in a stack (its model config class's `run_bytes`)."""
    return cfg.model.run_bytes(cfg)


GPU_CONTEXT_BYTES = 1 << 30  # per trial on a GPU: the CUDA context, the allocator's slack, evaluation chunks
GPU_USABLE = 0.9  # of a GPU's memory, the share trials may plan to fill
MAX_TRIALS_PER_GPU = 16


def check_gpu_share(share: float, stack_bytes: int, gpu_bytes: int) -> None:
    """Raise ValueError if trials of GPU share `share` cannot hold a stack of `stack_bytes`: with
    1/share trials on a GPU, each has share x GPU_USABLE of its memory for its tensors and context."""
    need = stack_bytes + GPU_CONTEXT_BYTES
    room = min(share, 1.0) * GPU_USABLE * gpu_bytes
    if room < need:
        largest = gpu_fraction(stack_bytes, gpu_bytes)  # raises if no share is enough
        raise ValueError(f"{share:g} of a GPU gives a trial {room / 2**30:.1f} GiB; its largest stack needs about {need / 2**30:.1f} GiB: give at least {largest:g}, or auto")


def gpu_fraction(stack_bytes: int, gpu_bytes: int) -> float:
    """The GPU share a trial asks Ray for, so that as many trials share a GPU as its memory allows.

    Ray does not isolate GPU memory: k trials on one GPU each hold their largest stack's tensors
    plus a CUDA context, and k is the most for which that fits in GPU_USABLE of the memory (at
    most MAX_TRIALS_PER_GPU). The share is 1/k rounded down to Ray's resolution of 1e-4.
    """
    need = stack_bytes + GPU_CONTEXT_BYTES
    k = min(MAX_TRIALS_PER_GPU, int(GPU_USABLE * gpu_bytes // need))
    if k < 1:
        raise ValueError(f"a stack needs about {need / 2**30:.1f} GiB and does not fit on a GPU of {gpu_bytes / 2**30:.1f} GiB; lower the sweep's bundle_size or B")
    return math.floor(1e4 / k) / 1e4


def work_kind(cfg: TrialConfig) -> str:
    """What a calibration prices a run's own work by: its family for the LSA, family/model otherwise."""
    return cfg.task.family if cfg.model.model == "lsa" else f"{cfg.task.family}/{cfg.model.model}"


@dataclass(frozen=True)
class Calibration:
    """Seconds per run on one device kind: a per kind of work (fixed), b per kind (per flop)."""

    device: str
    threads: int
    code: str
    per_run_s: dict[str, float]
    per_flop_s: dict[str, float]
    took_s: float

    def seconds(self, run: Run) -> float:
        fam, kind = run.config.task.family, work_kind(run.config)
        if kind not in self.per_flop_s:  # a model this calibration has not timed: the family's rate
            kind = fam
        shared = shared_flops(run.config)
        return self.per_run_s[kind] + self.per_flop_s[kind] * (flops(run) - shared) + self.per_flop_s[fam] * shared

    def shared_seconds(self, run: Run) -> float:
        """The part of `seconds(run)` that runs sharing its evaluation prompts pay once."""
        return self.per_flop_s[run.config.task.family] * shared_flops(run.config)


# small bundles that span the shapes of the shipped sweeps: (flat config, runs); two sizes per
# family separate the fixed cost from the cost per flop
_PROBES: list[tuple[dict[str, Any], int]] = [
    (dict(family="gmm", d=4, c=3, snr=1.0, N=50, B=1024, steps=30, lr=1.0, M=[16, 64, "inf"], n_eval=128), 4),
    (dict(family="gmm", d=8, c=3, snr=1.0, N=50, B=2048, steps=60, lr=1.0, M=[16, 64, "inf"], n_eval=256), 4),
    (dict(family="mor", d=4, K=2, snr=2.0, N=20, B=512, steps=30, lr=0.2, M=[16, "inf"], n_eval=64, em_iters=20), 4),
    (dict(family="mor", d=8, K=2, snr=2.0, N=40, B=2048, steps=60, lr=0.2, M=[32, 128, "inf"], n_eval=96, em_iters=30), 4),
    # the transformer alone (no baselines), at the widths of the shipped sweeps (dense products dominate
    # there; at width 16 the per-step overhead would pass for a slow rate per flop)
    (dict(family="gmm", d=4, c=3, snr=1.0, model="transformer", layers=1, width=32, heads=4, N=20, B=None, steps=10, batch=32, lr=1e-3, M=[20], n_eval=64, estimators=[]), 4),
    (dict(family="gmm", d=4, c=3, snr=1.0, model="transformer", layers=1, width=64, heads=4, N=20, B=None, steps=10, batch=32, lr=1e-3, M=[20], n_eval=64, estimators=[]), 4),
    (dict(family="mor", d=4, K=2, snr=2.0, model="transformer", layers=1, width=32, heads=4, N=20, B=None, steps=10, batch=32, lr=1e-3, M=[20], n_eval=64, estimators=[]), 4),
    (dict(family="mor", d=4, K=2, snr=2.0, model="transformer", layers=1, width=64, heads=4, N=20, B=None, steps=10, batch=32, lr=1e-3, M=[20], n_eval=64, estimators=[]), 4),
]


def device_name(device: str) -> str:
    """A device kind: the CPU model or the CUDA device's name."""
    if device.startswith("cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name(torch.device(device))}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu:" + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu:" + (platform.processor() or platform.machine())


def calibrate(device: str = "cpu", threads: int = 1) -> Calibration:
    """Time the probe bundles on `device` with `threads` torch threads (a few seconds on a CPU)."""
    import numpy as np
    import torch

    from pipelines.runner import code_version
    from study.trial import forget_kept, run_bundle

    t0 = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs: dict[str, list] = {}
        warm: set[str] = set()
        for flat, n in _PROBES:
            bundle = [Run(TrialConfig.from_flat(flat), seed) for seed in range(n)]
            kind = work_kind(bundle[0].config)
            if bundle[0].config.model.model not in warm:
                run_bundle(bundle[:1], device)  # warm-up: lazy initialisation, first-call costs
                warm.add(bundle[0].config.model.model)
            forget_kept()  # time the baselines too, as a first stack of their prompts pays them
            t = time.perf_counter()
            run_bundle(bundle, device)
            runs.setdefault(kind, []).append((n, sum(flops(r) for r in bundle), time.perf_counter() - t))
    finally:
        torch.set_num_threads(before)
    per_run, per_flop = {}, {}
    for fam, points in runs.items():
        a = np.array([[n, f] for n, f, _ in points], dtype=float)
        coef = np.linalg.lstsq(a, np.array([s for *_, s in points]), rcond=None)[0]
        # two probes give an exact fit; keep both parts non-negative (noise can push one below 0)
        per_flop[fam] = max(float(coef[1]), 1e-15)
        per_run[fam] = max(float(coef[0]), 0.0)
    return Calibration(device_name(device), threads, code_version().replace(".dirty", ""), per_run, per_flop, time.perf_counter() - t0)


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "icl-study" / "calibration.json"


def _key(device: str, threads: int, code: str) -> str:
    return f"{device} | threads {threads} | icl-study {code} | format {CALIBRATION_FORMAT}"


def cached() -> dict[str, Calibration]:
    """Every calibration in the cache, by key (unreadable or old-format entries are ignored)."""
    try:
        raw = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for key, value in raw.items() if isinstance(raw, dict) else []:
        try:
            out[key] = Calibration(**value)
        except TypeError:
            continue
    return {k: v for k, v in out.items() if k.endswith(f"format {CALIBRATION_FORMAT}")}


def calibration(device: str = "cpu", threads: int = 1, refresh: bool = False) -> Calibration:
    """The cached calibration of this device kind, or a new one (then cached)."""
    from pipelines.runner import code_version

    key = _key(device_name(device), threads, code_version().replace(".dirty", ""))
    known = cached()
    if key in known and not refresh:
        return known[key]
    cal = calibrate(device, threads)
    known[key] = cal
    path = cache_path()
    try:
        write_atomic(path, json.dumps({k: asdict(v) for k, v in known.items()}, indent=1))
    except OSError:
        pass  # a read-only home: the calibration is simply not cached
    return cal


# what `run` packs by on a device kind it has no calibration for: this project's 2-core CPU
NOMINAL = Calibration("nominal", 1, "-", {"gmm": 0.1, "mor": 0.07}, {"gmm": 3e-10, "mor": 3e-10}, 0.0)  # a transformer: priced as its family


def for_kind(kind: str, threads: int = 1, measure: bool = True, refresh: bool = False) -> Calibration:
    """The calibration to estimate a device kind ('cpu' or 'cuda') by.

    Measured here when `measure` (and the kind is here), else the newest cached one of the kind
    (from any code version), else NOMINAL: `run` never spends its own time calibrating, `plan` does.
    """
    known = list(cached().values())
    if kind == "cuda":
        import torch

        if measure and torch.cuda.is_available():
            return calibration("cuda", threads, refresh)
        gpus = [c for c in known if c.device.startswith("cuda")]
        if gpus:
            return gpus[-1]
    if measure:
        return calibration("cpu", threads, refresh)
    here = device_name("cpu")
    cpus = [c for c in known if c.device == here and c.threads == threads] or [c for c in known if c.device == here]
    return cpus[-1] if cpus else NOMINAL
