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
import shlex
import sys
import tomllib

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.commands import Command, exports, parse

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


def _commands(raw: dict, key: str) -> list[list[Command]]:
    """The simple commands of each line of a command list (tests/commands.py)."""
    return [parse(line) for line in raw.get(key) or []]


def _ray_starts(raw: dict, key: str) -> list[Command]:
    return [c for cmds in _commands(raw, key) for c in cmds if c.is_("ray", "start")]


def _run_options(docker: dict) -> list[tuple[str, str]]:
    """docker run's options as (flag, value): `--ulimit nofile=1:2`, `--ulimit=nofile=1:2` and `-v a:b`."""
    words = [w for opt in docker.get("run_options", []) for w in shlex.split(opt)]
    out = []
    for i, w in enumerate(words):
        if w.startswith("--") and "=" in w:
            out.append(tuple(w.split("=", 1)))
        elif w.startswith("-") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            out.append((w, words[i + 1]))
    return out


def _pinned_ray() -> str:
    """The Ray version pyproject.toml pins (`ray[tune]==X`)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "ray"]
    (pin,) = [s.version for s in spec if s.operator == "=="]
    return pin


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
    repo, _, tag = docker["image"].partition(":")
    version, python, flavour = tag.split("-")
    assert (repo, flavour) == ("rayproject/ray", "gpu"), docker["image"]
    assert version == ray.__version__ == _pinned_ray() and python == py, (
        f"driver runs Ray {ray.__version__} (pyproject pins {_pinned_ray()}) on {py}: the cluster image {docker['image']} must match"
    )
    for key in ("head_image", "worker_image"):
        assert key not in docker, f"docker.{key} would override the checked image"
    assert docker["container_name"]


def test_container_sees_shared_store(raw):
    opts = _run_options(raw["docker"])
    nofile = [tuple(int(n) for n in v.split("=", 1)[1].split(":")) for f, v in opts if f == "--ulimit" and v.startswith("nofile=")]
    assert nofile and all(soft >= 65536 and hard >= 65536 for soft, hard in nofile), opts
    # the container's hard limit lets every start line's `ulimit -n` succeed
    wanted = [int(c.argv[2]) for key in START_LISTS for cmds in _commands(raw, key) for c in cmds if c.is_("ulimit", "-n")]
    assert wanted and max(wanted) <= min(hard for _, hard in nofile), (wanted, nofile)
    mounts = [v.split(":")[1] for f, v in opts if f in ("-v", "--volume")]
    assert any("/shared/results".startswith(dst.rstrip("/") + "/") for dst in mounts), mounts


@pytest.mark.parametrize("key", START_LISTS)
def test_start_commands_raise_fd_limit_and_restart_ray(raw, key):
    lines = _commands(raw, key)
    stops = [i for i, cmds in enumerate(lines) if [c.argv[1:] for c in cmds] == [["stop"]] and cmds[0].program == "ray"]  # a line of `ray stop` alone
    starts = [i for i, cmds in enumerate(lines) if any(c.is_("ray", "start") for c in cmds)]
    assert len(starts) == 1 and stops and stops[0] < starts[0], raw[key]
    cmds = lines[starts[0]]
    at = next(j for j, c in enumerate(cmds) if c.is_("ray", "start"))
    # each list item runs in its own shell: the ulimit must precede `ray start` on the same line
    assert any(c.is_("ulimit", "-n") and int(c.argv[2]) >= 65536 for c in cmds[:at]), raw[key][starts[0]]


def test_head_start_uses_autoscaling_config(raw):
    (head,) = _ray_starts(raw, "head_start_ray_commands")
    opts = head.options()
    assert opts.get("head") is True and opts.get("autoscaling-config") == "~/ray_bootstrap_config.yaml", head.argv
    (worker,) = _ray_starts(raw, "worker_start_ray_commands")
    host, _, port = str(worker.options().get("address")).rpartition(":")
    assert "head" not in worker.options() and host == "$RAY_HEAD_IP" and port == opts["port"], (worker.argv, head.argv)


def test_setup_installs_the_synced_project(raw):
    remote = [dst for dst, src in raw["file_mounts"].items() if pathlib.Path(src) in (pathlib.Path("."), ROOT)]
    assert remote, "file_mounts must sync the repository root to the nodes"
    installs = [c for cmds in _commands(raw, "setup_commands") for c in cmds if c.is_("pip", "install")]
    assert any(c.argv[2:] == [flag, path] for c in installs for flag in ("-e", "--editable") for path in (remote[0], remote[0] + "/")), raw["setup_commands"]
    for c in installs:  # never reinstall a different Ray than the image's
        for i, word in enumerate(c.argv[2:], 2):
            if word.startswith("-") or c.argv[i - 1] in ("-e", "--editable", "-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url", "-f", "--find-links"):
                continue
            try:
                req = Requirement(word)
            except InvalidRequirement:
                continue
            if req.name == "ray":
                assert str(req.specifier) == f"=={ray.__version__}", c.argv


def test_no_secrets_committed(raw, text):
    # the text, comments included: a token or key must not appear anywhere in the file
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text)
    assert "PRIVATE KEY-----" not in text
    assert set(raw.get("auth", {})) <= {"ssh_user", "ssh_private_key"}
    setup = [c for key in ("setup_commands", *START_LISTS) for cmds in _commands(raw, key) for c in cmds]
    assert not [c for c in setup if "RAY_AUTH_TOKEN" in c.env or (c.is_("echo") and "RAY_AUTH_TOKEN" in exports(c.argv[1]))]
