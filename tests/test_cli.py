"""Bad input exits with status 2 and one message naming the file and the field; nothing runs."""

import os
import re
import socket

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.sweep import load_sweep, shipped

GOOD = {
    "name": "good",
    "family": "gmm",
    "fixed": {"d": 2, "snr": 1.0, "lr": 1.0, "steps": 5, "B": 64, "M": [4, ".inf"], "n_eval": 16},
    "grid": {"N": [5, 10]},
    "seeds": 2,
}


def write(tmp_path, doc, name="sweep.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc) if isinstance(doc, dict) else doc)
    return p


def edit(**changes):
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for path, value in changes.items():
        *head, last = path.split("__")
        target = doc
        for h in head:
            target = target[h]
        if value is None:
            target.pop(last)
        else:
            target[last] = value
    return doc


BAD = [
    (edit(fixed__typo=3), "typo"),
    (edit(bogus=1), "bogus"),
    (edit(family="nope"), "family"),
    (edit(fixed__estimators=["bayes", "oracle"]), "estimators"),
    (edit(fixed__d=0), "d"),
    (edit(grid__c=[2, 1]), "c"),
    (edit(fixed__snr=0), "snr"),
    (edit(grid__N=[0, 5]), "N"),
    (edit(fixed__M=[]), "M"),
    (edit(fixed__lr=-1.0), "lr"),
    (edit(fixed__cov="diag", fixed__kappa=0.5), "kappa"),
    (edit(fixed__steps=-1), "steps"),
    (edit(seeds=0), "seeds"),
    (edit(seeds=[]), "seeds"),
    (edit(grid__N=[]), "grid.N"),
    (edit(name=None), "name"),
    (edit(fixed__N=5), "N"),  # in fixed and grid
]


@pytest.mark.parametrize("doc, field", BAD)
@pytest.mark.parametrize("verb", ["plan", "run"])
def test_bad_sweeps_exit_2_naming_file_and_field(tmp_path, doc, field, verb):
    path = write(tmp_path, doc)
    store = tmp_path / "store"
    result = CliRunner().invoke(app, [verb, str(path), "--store", str(store)])
    assert result.exit_code == 2, result.output
    assert str(path) in result.output and f"'{field}'" in result.output
    assert result.output.count("error:") == 1
    assert not store.exists()  # untouched: not even created


def test_unreadable_yaml_and_missing_file(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(write(tmp_path, "name: [unclosed"))])
    assert result.exit_code == 2 and "not valid YAML" in result.output
    result = CliRunner().invoke(app, ["plan", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "quickstart" in result.output  # lists the shipped sweeps


def test_unwritable_store_exits_2_before_running(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(app, ["run", str(write(tmp_path, GOOD)), "--store", str(blocker / "store")])
    assert result.exit_code == 2 and "not writable" in result.output


def test_plan_counts(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(write(tmp_path, GOOD)), "--store", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    counts = dict(re.findall(r"^  (\w[\w ]*?)\s{2,}(\d+)", result.output, re.M))
    assert counts == {"configurations": "2", "seeds": "2", "runs": "4", "already done": "0", "to run": "4", "bundles": "1"}
    assert "1 chunk of at most 1000" in result.output
    assert re.search(r"estimate +cpu:.*: ~\d+ s of trial compute", result.output), result.output


@pytest.mark.parametrize("name", sorted(shipped()))
def test_shipped_sweeps_are_valid(name):
    sw = load_sweep(name)
    assert sw.runs and sw.bundles()


def test_store_in_use_by_a_live_run_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / ".lock").write_text(f"{socket.gethostname()} {os.getppid()} 2026-01-01T00:00:00")  # a live process
    result = CliRunner().invoke(app, ["run", str(write(tmp_path, GOOD)), "--store", str(store)])
    assert result.exit_code == 2 and "in use" in result.output
    assert sorted(p.name for p in store.iterdir()) == [".lock"]  # nothing ran, nothing was cleaned


def test_unreadable_store_file_exits_2(tmp_path):
    bad = tmp_path / "store" / "trials" / "family=gmm" / "part-0000.parquet"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"")  # e.g. truncated by a crash of a file system without fsync
    result = CliRunner().invoke(app, ["plan", str(write(tmp_path, GOOD)), "--store", str(tmp_path / "store")])
    assert result.exit_code == 2 and "unreadable file" in result.output and str(bad) in result.output


def test_cuda_without_a_gpu_is_bad_input(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    result = CliRunner().invoke(app, ["run", str(write(tmp_path, GOOD)), "--store", str(tmp_path / "s"), "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output


MOR = {
    "name": "mor",
    "parts": [
        {"family": "mor", "fixed": {"d": 2, "snr": 1.0, "sigma": 0.5, "lr": 0.1, "steps": 5, "B": 64, "M": [4], "n_eval": 16}, "grid": {"N": [5]}},
    ],
}


def mor_with(**fixed):
    doc = {"name": "mor", "parts": [{**MOR["parts"][0], "fixed": {**MOR["parts"][0]["fixed"], **fixed}}]}
    return doc


@pytest.mark.parametrize(
    "doc, field",
    [
        (mor_with(K=0), "K"),
        (mor_with(K=2, pi=[0.5, 0.6]), "pi"),
        (mor_with(K=3, pi=[0.5, 0.5]), "pi"),
        (mor_with(sigma=-0.1), "sigma"),
        (mor_with(K=3, symmetric=True), "symmetric"),
        (mor_with(K=2, assignment="prompt", components="fresh"), "assignment"),
        (mor_with(estimators=["bayes"]), "estimators"),
        (mor_with(c=3), "c"),  # a gmm field in a mor part
        ({"name": "x", "parts": [{"family": "mor", "fixd": {}}]}, "parts[0].fixd"),
        ({"name": "x", "family": "gmm", "parts": []}, "parts"),
        ({**GOOD, "fixed": {**GOOD["fixed"], "em_iters": 3}}, "em_iters"),  # EM settings are mor's
    ],
)
def test_bad_mor_and_part_sweeps(tmp_path, doc, field):
    result = CliRunner().invoke(app, ["plan", str(write(tmp_path, doc))])
    assert result.exit_code == 2, result.output
    assert f"'{field}'" in result.output, result.output


def test_parts_union_and_own_bundle_size(tmp_path):
    from pipelines.sweep import load_sweep

    doc = {"name": "two", "seeds": 2, "bundle_size": 32, "parts": [{**MOR["parts"][0], "bundle_size": 1}, {k: GOOD[k] for k in ("family", "fixed", "grid")}]}
    sw = load_sweep(write(tmp_path, doc))
    assert {c.task.family for c in sw.configs} == {"gmm", "mor"}
    sizes = sorted((s[0].config.task.family, len(s)) for s in sw.stacks())
    assert sizes == [("gmm", 4), ("mor", 1), ("mor", 1)]


def test_an_address_that_does_not_answer_exits_2_before_running(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    store = tmp_path / "s"
    result = CliRunner().invoke(app, ["run", str(write(tmp_path, GOOD)), "--store", str(store), "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == 2 and "no Ray cluster answers" in result.output and "within 10 s" in result.output
    assert not store.exists()


@pytest.mark.parametrize("value", ["x", "-1", "nan"])
def test_a_bad_gpu_share_exits_2(tmp_path, value):
    result = CliRunner().invoke(app, ["run", str(write(tmp_path, GOOD)), "--store", str(tmp_path / "s"), "--gpus-per-trial", value])
    assert result.exit_code == 2 and "--gpus-per-trial: a number >= 0 or auto" in result.output
