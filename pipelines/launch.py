"""Launching a Ray cluster for the project: check a cluster-launcher file, then `ray up` / `ray down`.

    icl-study cluster check clusters/local-ssh.yaml   # placeholders, Ray's validation, token auth
    icl-study cluster up clusters/local-ssh.yaml      # check, then `ray up -y` (from the repo root)
    icl-study cluster down clusters/local-ssh.yaml    # `ray down -y`

A file that still holds placeholders (an `EDIT-ME` value, or a documentation address from RFC 5737
/ RFC 3849 such as 192.0.2.10) or that Ray rejects exits with status 2 and one line, before anything
runs. Token authentication must be set the same way everywhere (docs/cluster.md): Ray 2.60 turns it
on in `ray start --head` only when that host already has a token, never in `ray start --address`,
and a client holding another token fails with InvalidAuthToken. So every `ray start` sets
RAY_AUTH_MODE (and with `token`, RAY_AUTH_TOKEN_PATH to a file that file_mounts delivers), and
setup_commands export the same values for the shells of `ray exec`, `attach`, `submit` and `down`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import ipaddress
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
import yaml

PLACEHOLDER = "EDIT-ME"
DOC_NETWORKS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]
START_LISTS = ("head_start_ray_commands", "worker_start_ray_commands")
ENV_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
# a value may be quoted; `$HOME/`, `${HOME}/` and `~/` name the same place
_ASSIGN = r"\b{}=(['\"]?)([^\s'\";]+)\1"
MODE_RE = re.compile(_ASSIGN.format("RAY_AUTH_MODE"))
PATH_RE = re.compile(_ASSIGN.format("RAY_AUTH_TOKEN_PATH"))
RAW_TOKEN_RE = re.compile(r"\bRAY_AUTH_TOKEN=\S")
DEFAULT_TOKEN = "~/.ray/auth_token"  # where `ray get-auth-token --generate` writes (Ray 2.60)

cluster_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Check a Ray cluster-launcher file, then start or stop the cluster.")


class ClusterFileError(Exception):
    """A cluster file that must not be launched; the message is one line."""


@dataclass(frozen=True)
class Checked:
    """A cluster file that passed `check`: its raw dict and what the launch needs to know."""

    path: Path
    config: dict[str, Any]
    auth_mode: str
    token_path: str | None  # on the nodes, `~/...` form
    token_source: str | None  # on the launching machine, as written in file_mounts
    notes: list[str] = field(default_factory=list)


def _home_form(path: str) -> str:
    return re.sub(r"^(\$HOME|\$\{HOME\})/", "~/", path)


def _walk(node: Any, where: str = ""):
    """(dotted location, value) for every scalar in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{where}[{i}]")
    else:
        yield where, node


def _placeholder(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    if PLACEHOLDER.lower() in value.lower():
        return PLACEHOLDER
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if any(address in net for net in DOC_NETWORKS):
        return f"{value.strip()}, a documentation address"
    return None


def placeholders(config: dict[str, Any]) -> list[str]:
    """Locations of the values still to be edited, e.g. `provider.head_ip (EDIT-ME)`."""
    return [f"{where} ({what})" for where, value in _walk(config) if (what := _placeholder(value))]


def _ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to the file before it talks to any node (tests/test_cluster_yaml.py)."""
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    sink = io.StringIO()  # Ray's cli_logger prints its own copy of an abort message
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            prepared = prepare_config(copy.deepcopy(config))
            validate_config(prepared)
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "the top level"
        raise ClusterFileError(f"Ray rejects it at {where}: {err.message}") from None
    except click.ClickException as err:
        raise ClusterFileError(f"Ray rejects it: {err.message}") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ClusterFileError(f"Ray rejects it: {err}") from None
    return prepared


def _auth(config: dict[str, Any], text: str) -> tuple[str, str | None, str | None]:
    """The cluster's (auth mode, token path on the nodes, its file_mounts source), if consistent."""
    if RAW_TOKEN_RE.search(text):
        raise ClusterFileError("RAY_AUTH_TOKEN=<value> puts a secret in the file: deliver a token file with file_mounts and RAY_AUTH_TOKEN_PATH")
    modes: dict[str, set[str]] = {}
    paths: dict[str, set[str]] = {}
    env_modes: set[str] = set()
    env_paths: set[str] = set()
    for key in (*START_LISTS, *ENV_LISTS):
        for i, cmd in enumerate(config.get(key) or []):
            where = f"{key}[{i}]"
            found_modes = {m.group(2) for m in MODE_RE.finditer(str(cmd))}
            found_paths = {_home_form(m.group(2)) for m in PATH_RE.finditer(str(cmd))}
            if key in START_LISTS and "ray start" in str(cmd) and not found_modes:
                raise ClusterFileError(
                    f"{where}: `ray start` without RAY_AUTH_MODE (Ray 2.60 enables token auth at `ray start --head` only if "
                    "that host has a token, never at `ray start --address`): set RAY_AUTH_MODE=token on every `ray start`"
                )
            for m in found_modes:
                modes.setdefault(m, set()).add(where)
            for p in found_paths:
                paths.setdefault(p, set()).add(where)
            if key in ENV_LISTS:
                env_modes |= found_modes
                env_paths |= found_paths
    if not modes:
        raise ClusterFileError("no `ray start` command found in head_start_ray_commands")
    if len(modes) > 1:
        raise ClusterFileError("RAY_AUTH_MODE differs between commands: " + "; ".join(f"{m} in {', '.join(sorted(w))}" for m, w in sorted(modes.items())))
    (mode,) = modes
    if mode not in ("token", "disabled"):
        raise ClusterFileError(f"RAY_AUTH_MODE={mode}: Ray 2.60 knows `token` and `disabled`")
    if not env_modes:
        raise ClusterFileError(
            f"setup_commands do not export RAY_AUTH_MODE={mode} for the shells of `ray exec`/`attach`/`submit`/`down` "
            "(e.g. into a file that ~/.bashrc sources): `icl-study run --address auto` there would guess the mode from ~/.ray/auth_token"
        )
    if mode == "disabled":
        if paths:
            raise ClusterFileError("RAY_AUTH_TOKEN_PATH is set but RAY_AUTH_MODE=disabled")
        return mode, None, None
    starts = [(f"{k}[{i}]", c) for k in START_LISTS for i, c in enumerate(config.get(k) or []) if "ray start" in str(c)]
    for where, cmd in starts:
        if not PATH_RE.search(str(cmd)):
            raise ClusterFileError(f"{where}: `ray start` with RAY_AUTH_MODE=token but no RAY_AUTH_TOKEN_PATH: the node would use whatever ~/.ray/auth_token it has")
    if len(paths) > 1:
        raise ClusterFileError("RAY_AUTH_TOKEN_PATH differs between commands: " + "; ".join(f"{p} in {', '.join(sorted(w))}" for p, w in sorted(paths.items())))
    (token,) = paths
    if not env_paths:
        raise ClusterFileError(f"setup_commands do not export RAY_AUTH_TOKEN_PATH={token} for the shells of `ray exec`/`attach`/`submit`/`down`")
    mounts = {_home_form(str(dst).rstrip("/")): src for dst, src in (config.get("file_mounts") or {}).items()}
    if token not in mounts:
        raise ClusterFileError(f"RAY_AUTH_TOKEN_PATH={token} is not a file_mounts destination: nothing would put the token there")
    return mode, token, str(mounts[token])


def check(path: Path) -> Checked:
    """Check a cluster-launcher file without touching any node; raise ClusterFileError with one line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ClusterFileError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ClusterFileError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ClusterFileError(f"{path}: not a cluster-launcher file (a YAML mapping)")
    left = placeholders(config)
    if left:
        raise ClusterFileError(f"{path}: placeholders left in {', '.join(left)}: edit them first")
    try:
        _ray_validate(config)
        mode, token, source = _auth(config, text)
    except ClusterFileError as err:
        raise ClusterFileError(f"{path}: {err}") from None
    return Checked(path, config, mode, token, source)


def preflight(checked: Checked, cwd: Path | None = None) -> list[str]:
    """What `ray up` needs on the launching machine; raises ClusterFileError, returns warnings."""
    cwd = Path(cwd or Path.cwd())
    warnings = []
    for tool in ("ssh", "rsync"):
        if shutil.which(tool) is None:
            raise ClusterFileError(f"`{tool}` not found on PATH: the cluster launcher needs it (Debian: apt-get install openssh-client rsync)")
    for dst, src in (checked.config.get("file_mounts") or {}).items():
        local = Path(os.path.expanduser(str(src)))
        local = local if local.is_absolute() else cwd / local
        if _home_form(str(dst).rstrip("/")) == checked.token_path:
            if not local.is_file() or local.stat().st_size == 0:
                raise ClusterFileError(
                    f"no token at {src} (for {dst} on the nodes): create it with `ray get-auth-token --generate` and `chmod 600 {src}`"
                )
            if local.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                warnings.append(f"{src} is readable by other users: chmod 600 {src}")
        elif not local.exists():
            raise ClusterFileError(f"file_mounts source {src} ({local}) does not exist")
        elif str(src).strip() in (".", "./"):
            project = local / "pyproject.toml"
            if not project.is_file() or not re.search(r'(?m)^name\s*=\s*"icl-study"', project.read_text()):
                raise ClusterFileError(f"file_mounts syncs {local} to {dst}, which is not the icl-study repository: run from the repository root")
    return warnings


def _ray() -> str:
    """The `ray` of this environment: the cluster must run the Ray that checked the file."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"icl-study: error: {message}", err=True)
    return typer.Exit(2)


def _checked(file: Path) -> Checked:
    try:
        return check(file)
    except ClusterFileError as err:
        raise _fail(str(err)) from None


def _describe(c: Checked) -> str:
    prov = c.config.get("provider", {})
    where = f"head {prov['head_ip']}, {len(prov.get('worker_ips') or [])} workers" if prov.get("type") == "local" else f"provider {prov.get('type')}"
    auth = f"token auth, {c.token_path} on the nodes from {c.token_source}" if c.auth_mode == "token" else "no token auth"
    return f"{c.path}: ok ({where}; {'docker' if c.config.get('docker') else 'no docker'}; {auth})"


FILE = typer.Argument(..., help="a Ray cluster-launcher file, e.g. clusters/local-ssh.yaml or cluster.yaml")
RAY_ARGS = typer.Argument(None, help="more options for the ray command, after --, e.g. -- --no-config-cache")


@cluster_app.command("check")
def check_cmd(file: Path = FILE) -> None:
    """Check a cluster file: placeholders left, Ray's own validation, token-auth settings."""
    typer.echo(_describe(_checked(file)))


@cluster_app.command()
def up(file: Path = FILE, ray_args: list[str] = RAY_ARGS) -> None:
    """Check the file and this machine, then `ray up -y FILE` (run it from the repository root)."""
    checked = _checked(file)
    try:
        warnings = preflight(checked)
    except ClusterFileError as err:
        raise _fail(str(err)) from None
    for w in warnings:
        typer.echo(f"icl-study: warning: {w}", err=True)
    typer.echo(_describe(checked))
    rc = subprocess.call([_ray(), "up", "-y", str(file), *(ray_args or [])])
    if rc:
        raise typer.Exit(rc)


@cluster_app.command()
def down(file: Path = FILE, ray_args: list[str] = RAY_ARGS) -> None:
    """`ray down -y FILE`: stops Ray on the nodes (`ray stop` ends every Ray process of that user there)."""
    _checked(file)
    rc = subprocess.call([_ray(), "down", "-y", str(file), *(ray_args or [])])
    if rc:
        raise typer.Exit(rc)
