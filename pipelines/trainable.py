"""The Ray Tune trainable and the driver's progress callback: one bundle per trial, on a worker process that Tune keeps between trials.

A function trainable costs every trial a new worker process, the torch import and the study's
imports (about 4-5 s of worker time on a 2-core machine). `BundleTrial` is a class trainable whose
`reset_config` accepts the next trial's config, so with `reuse_actors=True` one worker runs trial
after trial and pays those costs once. One trial is still one bundle: the unit of Tune's retry
and of the store's commit. Imported only after the runner has set Tune's environment.
"""

from __future__ import annotations

from typing import Any, Callable

from ray import tune


class BundleTrial(tune.Trainable):
    """Runs `execute(bundle, store, sweep, code, device)` once and reports its summary."""

    def setup(self, config: dict[str, Any], execute: Callable[..., dict[str, Any]] | None = None) -> None:
        import torch

        self._execute = execute
        torch.set_num_threads(max(1, int(config["job"]["threads"])))

    def step(self) -> dict[str, Any]:
        job = self.config["job"]
        summary = self._execute(job["bundle"], job["store"], job["sweep"], job["code"], job["device"])
        return {**summary, "done": True}

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        return True  # nothing is kept between bundles but the process and its imports

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        return None  # a bundle is one step: a retry recomputes it

    def load_checkpoint(self, checkpoint: Any) -> None:
        pass


class ProgressCallback(tune.Callback):
    """Tells a `pipelines.progress.Progress` of every trial that finishes or fails for good."""

    def __init__(self, progress: Any, bundles: dict[str, tuple[int, float]]):
        self.progress, self.bundles = progress, bundles  # bundle id -> (runs, estimated cost)

    def __getstate__(self) -> dict[str, Any]:
        return {}  # Tune snapshots its callbacks with the experiment; this one lives in the driver

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        bundle_id = trial.config["job"]["bundle_id"]
        detail = f"{result['runs']} runs ({result['ok']} ok, {result['diverged']} diverged) in {result['wall_s']:.1f}s"
        self.progress.finished(bundle_id, *self.bundles[bundle_id], detail)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        bundle_id = trial.config["job"]["bundle_id"]
        self.progress.finished(bundle_id, *self.bundles[bundle_id], "failed after its retries", failed=True)
