"""cluster.yaml: valid for Ray's cluster launcher, and fit for this project.

Fast and offline: nothing here starts Ray, opens SSH or touches a cloud API. Ray's own check is
`ray up` -> `_bootstrap_config`: `prepare_config` (merge provider defaults; for the local provider
build the single node type from head_ip/worker_ips) and then `validate_config` (jsonschema against
ray-schema.json plus cross-field checks). Both are pure functions of the dict, so we call them.
`validate_config` alone on the raw file is not Ray's check: it requires fields that only the
defaults merge adds (`cluster_synced_files`).
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import sys

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
SCHEMA_PATH = pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json"
START_LISTS = ("head_start_ray_commands", "worker_start_ray_commands")


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def raw(text: str) -> dict:
    cfg = yaml.safe_load(text)
    assert isinstance(cfg, dict), "cluster.yaml must be a mapping"
    return cfg


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _ray_validate(cfg: dict) -> dict:
    """What `ray up` does to the file before it talks to any node."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def _aws_block(text: str) -> dict:
    """The commented AWS alternative, uncommented: the `#` lines after the 'AWS alternative' header."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if "AWS alternative" in ln) + 1
    body = []
    for ln in lines[start:]:
        if not ln.startswith("#"):
            break
        body.append(ln[2:] if ln.startswith("# ") else ln[1:])
    block = yaml.safe_load("\n".join(body))
    assert isinstance(block, dict) and block, "no YAML found in the commented AWS alternative"
    return block


# ---- Ray's own validation -----------------------------------------------------------------------


def test_raw_file_matches_ray_schema(raw, schema):
    jsonschema.validate(raw, schema)


def test_ray_prepare_and_validate_config(raw):
    prepared = _ray_validate(raw)
    node_types = prepared["available_node_types"]
    assert prepared["head_node_type"] in node_types
    # the local provider keeps every listed worker up
    assert prepared["max_workers"] == len(raw["provider"]["worker_ips"])


def test_commented_aws_alternative_is_valid(raw, text, schema):
    aws = _aws_block(text)
    assert aws["provider"]["type"] == "aws"
    gpu_types = [n for n in aws["available_node_types"].values() if n["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu_types, "the AWS alternative should offer a GPU instance type"
    cfg = {k: v for k, v in raw.items() if k not in ("provider", "auth")}
    cfg.update(aws)
    jsonschema.validate(cfg, schema)
    _ray_validate(cfg)


# ---- project requirements ----------------------------------------------------------------------


def test_local_provider_with_placeholders(raw):
    prov = raw["provider"]
    assert prov["type"] == "local"
    assert prov["head_ip"] and prov["worker_ips"]
    # Ray aborts on these for the local provider (it builds the node type itself)
    assert "available_node_types" not in raw and "head_node_type" not in raw


def test_docker_image_matches_installed_ray_and_python(raw):
    docker = raw["docker"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert docker["image"] == f"rayproject/ray:{ray.__version__}-{py}-gpu", (
        f"driver runs Ray {ray.__version__} on {py}: the cluster image must match"
    )
    for key in ("head_image", "worker_image"):
        assert key not in docker, f"docker.{key} would override the checked image"
    assert docker["container_name"]


def test_container_sees_shared_store(raw):
    opts = " ".join(raw["docker"].get("run_options", []))
    assert re.search(r"(^|\s)--ulimit nofile=65536:65536(\s|$)", opts)
    mounts = re.findall(r"-v\s+\S+:(\S+)", opts)
    assert any("/shared/results".startswith(dst.rstrip("/") + "/") for dst in mounts), mounts


@pytest.mark.parametrize("key", START_LISTS)
def test_start_commands_raise_fd_limit_and_restart_ray(raw, key):
    cmds = raw[key]
    assert any("ulimit -n 65536" in c for c in cmds)
    assert any(c.strip() == "ray stop" for c in cmds)
    starts = [c for c in cmds if "ray start" in c]
    assert len(starts) == 1, starts
    # each list item runs in its own shell: the ulimit must precede `ray start` on the same line
    before, _, _ = starts[0].partition("ray start")
    assert "ulimit -n 65536" in before, starts[0]
    assert cmds.index(starts[0]) > next(i for i, c in enumerate(cmds) if c.strip() == "ray stop")


def test_head_start_uses_autoscaling_config(raw):
    (head,) = [c for c in raw["head_start_ray_commands"] if "ray start" in c]
    assert "--head" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    (worker,) = [c for c in raw["worker_start_ray_commands"] if "ray start" in c]
    assert "--address=$RAY_HEAD_IP:6379" in worker


def test_setup_installs_the_synced_project(raw):
    remote = [dst for dst, src in raw["file_mounts"].items() if pathlib.Path(src) in (pathlib.Path("."), ROOT)]
    assert remote, "file_mounts must sync the repository root to the nodes"
    setup = raw["setup_commands"]
    assert any(re.search(rf"pip install (-e |--editable ){re.escape(remote[0])}/?$", c) for c in setup), setup
    for c in setup:  # never reinstall a different Ray than the image's
        if re.search(r"pip install .*\bray\b", c):
            assert f"=={ray.__version__}" in c, c


def test_no_secrets_committed(raw, text):
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text)
    assert "PRIVATE KEY-----" not in text
    assert set(raw.get("auth", {})) <= {"ssh_user", "ssh_private_key"}
