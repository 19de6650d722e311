"""The suite's shared setup: one torch thread, and the canonical flat configurations as fixtures.

What the default run includes: `pytest` (what `.ci/run` and the README's test command run) runs
every test, the markers deselect nothing:
- `ray`: tests that start a local Ray (`ray.init`, a Tuner, `icl-study run` through the CLI,
  `ray.cluster_utils.Cluster`);
- `slow`: tests of a minute or more (whole sweeps through Ray, the faults, the report in a real
  browser, the real cluster launch);
- `cluster`: `ray up` for real over SSH to this machine; it skips without sshd and rsync.
Other tests skip where a tool is missing: the report's Chromium test without chromium, the GPU
tests (tests/test_gpu.py) without CUDA. A quick run leaves the long ones out:
`pytest -m "not slow and not cluster"` (or `-m "not ray"` for no Ray at all).
"""

import pytest
import torch

from tests import configs

# One thread: the suite's tensors are small, and on a shared 2-core machine OpenMP's spin-waiting
# threads can stall each parallel region when the cores are oversubscribed (Ray workers run beside).
torch.set_num_threads(1)


@pytest.fixture
def gmm_flat() -> dict:
    """A fresh copy of the canonical gmm flat config (tests/configs.py): change what the test needs."""
    return configs.gmm()


@pytest.fixture
def mor_flat() -> dict:
    """A fresh copy of the canonical mor flat config (tests/configs.py)."""
    return configs.mor()
