"""benchmarks/roofline.py --quick runs end to end and reports every kernel against a roof."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"reduced step", "full step", "Newton optimum", "logreg", "EM", "evaluation pass", "peer"}


def test_roofline_quick(tmp_path):
    out = tmp_path / "roofline.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "roofline.py"), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["benchmark"] == "roofline"
    res = rec["results"]
    for roofs in (res["roofs"]["before"], res["roofs"]["after"], res["roofs"]["used"]):
        assert all(roofs[k] > 0 for k in ("bandwidth", "gemm64", "gemm32"))
    kernels = res["kernels"]
    assert {k["group"] for k in kernels} == GROUPS
    assert len({k["name"] for k in kernels}) == len(kernels)
    for k in kernels:
        assert k["s"] > 0, k["name"]
        assert k["bytes"] > 0 and k["flops"] > 0, k["name"]
        assert 0 < k["fraction"] <= 1.5, (k["name"], k["fraction"])
        assert k["binds"] in ("bandwidth", "gemm64", "gemm32", "mixed"), k["name"]
    peer = res["peer"]
    assert peer["ratio_reduced"] > 0 and peer["ratio_full"] > 0
    # the literal float32 transformer and the project's float64 statistics give the same loss
    assert max(peer["loss_diff_vs_literal"].values()) < 1e-4
    assert peer["ratio_reduced_vs_lean"] > 0
    assert "Peer" in p.stdout and "| kernel |" in p.stdout
