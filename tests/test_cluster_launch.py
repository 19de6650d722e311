"""Launching a cluster: `icl-study cluster check/up/down` on the shipped cluster files (fast, offline),
and `ray up` for real with clusters/local-ssh.yaml over SSH to this machine (marker `cluster`).

The real launch needs sshd and rsync (Debian: `apt-get install openssh-server rsync`; as root also
`mkdir -p -m 0755 /run/sshd`, which the ssh service would create) and skips without them. It starts
no daemon and touches no file outside its temporary folder: ssh reaches the head through
`ssh_proxy_command: sshd -i -f <config>` (sshd in inetd mode on the ssh connection's pipe, with a
test host key, the test's authorized_keys and HOME set to a temporary "head home"), so the venv,
~/.bashrc, ~/icl-study and the token that `ray up` writes on the head all land in tmp_path, never in
the real home nor in /work/main/.venv. `ray up` and `ray down` run `ray stop`, which ends every Ray
process on the head, here this machine: the test skips when Ray already runs here.
Measured on 2 cores (packages from the local mirror): 3.5 to 6 minutes, most of it `pip install`
into the head's fresh venv; see docs/cluster.md.
"""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipelines import launch
from tests import configs
from tests.commands import exports, home, parse

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SSH = ROOT / "clusters" / "local-ssh.yaml"
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY = str(Path(sys.executable).parent / "ray")
CLI = [sys.executable, "-c", "from pipelines.cli import app; app()"]

SMOKE = configs.smoke("cluster-smoke")


def fill(path: Path, **top) -> dict:
    """The file with its placeholders replaced by plausible values (and `top` keys replaced)."""
    cfg = yaml.safe_load(path.read_text())
    cfg["provider"].update(head_ip="10.0.0.1", worker_ips=["10.0.0.2", "10.0.0.3"])
    cfg["auth"] = {"ssh_user": "alice", "ssh_private_key": "~/.ssh/id_ed25519"}
    cfg.update(top)
    return cfg


def write(tmp_path: Path, cfg: dict, name: str = "cluster.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def cluster(*args: str):
    return CliRunner().invoke(launch.cluster_app, [str(a) for a in args])


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icl-study: error: "), result.stderr
    return lines[0]


def names(message: str, *fields: str) -> bool:
    """The message names each field (a location such as `provider.worker_ips[0]`, a variable, a
    path or a value) as a whole word: `RAY_AUTH_TOKEN` is not named by `RAY_AUTH_TOKEN_PATH`."""
    return all(re.search(rf"(?<![\w.$]){re.escape(f)}(?![\w\[])", message) for f in fields)


def placeholders(path: Path) -> dict[str, str]:
    """Location -> value of every value still to edit: EDIT-ME, or a documentation address (RFC 5737)."""
    docs = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]

    def doc_address(v) -> bool:
        try:
            return any(ipaddress.ip_address(v) in n for n in docs)
        except ValueError:
            return False

    return {w: v for w, v in launch._walk(yaml.safe_load(path.read_text())) if isinstance(v, str) and (v == launch.PLACEHOLDER or doc_address(v))}


# ---- offline: the shipped files and the checks -------------------------------------------------


def test_hooked_into_the_cli():
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["cluster", "check", str(LOCAL_SSH)])
    assert names(one_error(result), str(LOCAL_SSH), *placeholders(LOCAL_SSH))


@pytest.mark.parametrize(
    "path, expected",
    [
        (LOCAL_SSH, {"provider.head_ip", "provider.worker_ips[0]", "auth.ssh_user", "auth.ssh_private_key"}),
        (CLUSTER_YAML, {"provider.head_ip", "provider.worker_ips[0]", "provider.worker_ips[1]"}),  # documentation addresses
    ],
    ids=[LOCAL_SSH.name, CLUSTER_YAML.name],
)
def test_shipped_files_name_their_placeholders(path, expected):
    left = placeholders(path)
    assert set(left) == expected
    msg = one_error(cluster("check", path))
    for where, value in left.items():
        assert names(msg, where, value), (where, value, msg)
    with pytest.raises(launch.ClusterFileError):
        launch.check(path)


@pytest.mark.parametrize("path", [LOCAL_SSH, CLUSTER_YAML], ids=lambda p: p.name)
def test_filled_in_copy_passes(tmp_path, path):
    filled = write(tmp_path, fill(path))
    result = cluster("check", filled)
    assert result.exit_code == 0 and not result.stderr, result.output
    checked = launch.check(filled)
    assert (checked.auth_mode, checked.token_path, checked.token_source) == ("token", "~/.ray/icl-study.token", "~/.ray/auth_token")
    assert names(result.output, str(filled), "10.0.0.1", checked.token_path, checked.token_source), result.output


@pytest.mark.parametrize("path", [LOCAL_SSH, CLUSTER_YAML], ids=lambda p: p.name)
def test_shipped_files_start_ray_with_the_token_they_deliver(path):
    """Every `ray start` sets RAY_AUTH_MODE=token and a RAY_AUTH_TOKEN_PATH that file_mounts fills
    from ~/.ray/auth_token; setup_commands write the same two into a file that ~/.bashrc sources."""
    cfg = yaml.safe_load(path.read_text())
    mounts = {home(str(dst).rstrip("/")): str(src) for dst, src in cfg["file_mounts"].items()}
    starts = [c for key in launch.START_LISTS for line in cfg[key] for c in parse(line) if c.is_("ray", "start")]
    assert len(starts) == 2 and {(c.env.get("RAY_AUTH_MODE"), home(c.env.get("RAY_AUTH_TOKEN_PATH", ""))) for c in starts} == {("token", "~/.ray/icl-study.token")}
    assert mounts["~/.ray/icl-study.token"] == launch.DEFAULT_TOKEN
    setup = [c for line in cfg["setup_commands"] for c in parse(line)]
    written = {c.redirect[1]: c.argv[1] for c in setup if c.is_("echo") and c.redirect and c.redirect[0] == ">"}
    sourced = [s.argv[1] for c in setup if c.is_("echo") and c.redirect == (">>", "~/.bashrc") for s in parse(c.argv[1]) if s.is_("source")]
    assert sourced and all(f in written for f in sourced), (sourced, written)
    for f in sourced:
        exported = exports(written[f])
        assert (exported.get("RAY_AUTH_MODE"), exported.get("RAY_AUTH_TOKEN_PATH")) == ("token", "~/.ray/icl-study.token"), (f, exported)


def _edit(cfg: dict, key: str, i: int, old: str, new: str) -> dict:
    assert old in cfg[key][i], cfg[key][i]
    cfg[key][i] = cfg[key][i].replace(old, new)
    return cfg


@pytest.mark.parametrize(
    "change, fields",
    [
        (lambda c: _edit(c, "worker_start_ray_commands", 1, "RAY_AUTH_MODE=token ", ""), ("worker_start_ray_commands[1]", "RAY_AUTH_MODE")),
        (lambda c: _edit(c, "head_start_ray_commands", 1, "icl-study.token", "other.token"), ("RAY_AUTH_TOKEN_PATH", "head_start_ray_commands[1]", "worker_start_ray_commands[1]")),
        (lambda c: _edit(c, "worker_start_ray_commands", 1, "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"), ("RAY_AUTH_MODE", "head_start_ray_commands[1]", "worker_start_ray_commands[1]")),
        (lambda c: {**c, "file_mounts": {"~/icl-study": "."}}, ("RAY_AUTH_TOKEN_PATH", "file_mounts")),
        (lambda c: {**c, "setup_commands": [s for s in c["setup_commands"] if "icl-study.env" not in s or "source" in s]}, ("setup_commands", "RAY_AUTH_MODE")),
        (lambda c: {**c, "setup_commands": [*c["setup_commands"], "echo export RAY_AUTH_TOKEN=0123abcd >> ~/.bashrc"]}, ("RAY_AUTH_TOKEN",)),
    ],
    ids=["start-without-mode", "two-token-paths", "two-modes", "token-not-delivered", "no-env-for-exec", "raw-token"],
)
def test_inconsistent_token_auth_is_refused(tmp_path, change, fields):
    path = write(tmp_path, change(fill(LOCAL_SSH)))
    msg = one_error(cluster("check", path))
    assert names(msg, str(path), *fields), msg
    with pytest.raises(launch.ClusterFileError):
        launch.check(path)


@pytest.mark.parametrize(
    "top, field",
    [({"head_node_type": "x", "available_node_types": {"x": {"node_config": {}, "resources": {}}}}, "available_node_types"), ({"max_worker": 2}, "max_worker")],
    ids=["node-types-on-premise", "unknown-key"],
)
def test_what_ray_rejects_is_refused_in_one_line(tmp_path, top, field):
    cfg = fill(LOCAL_SSH, **top)
    msg = one_error(cluster("check", write(tmp_path, cfg)))
    with pytest.raises(launch.ClusterFileError) as err:
        launch._ray_validate(cfg)  # Ray's own validation is what refuses it
    assert str(err.value) in msg and names(msg, field), msg


def test_up_refuses_before_running_anything(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    monkeypatch.setattr(launch.shutil, "which", lambda tool: f"/usr/bin/{tool}")  # ssh and rsync need not be here
    one_error(cluster("up", LOCAL_SSH))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token there
    monkeypatch.chdir(ROOT)
    filled = write(tmp_path, fill(LOCAL_SSH))
    assert names(one_error(cluster("up", filled)), launch.DEFAULT_TOKEN, "~/.ray/icl-study.token")  # no token to deliver
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 32)
    (tmp_path / ".ray" / "auth_token").chmod(0o600)
    monkeypatch.chdir(tmp_path)
    assert names(one_error(cluster("up", filled)), "file_mounts", "~/icl-study", str(tmp_path))  # "." is not the repository here
    assert calls == []
    monkeypatch.chdir(ROOT)
    result = cluster("up", filled, "--", "--no-config-cache")
    assert result.exit_code == 0 and calls == [([RAY, "up", "-y", str(filled), "--no-config-cache"],)], (result.output, calls)


def test_local_ssh_installs_into_its_own_venv():
    from packaging.requirements import Requirement

    cfg = yaml.safe_load(LOCAL_SSH.read_text())
    assert "docker" not in cfg and cfg["provider"]["type"] == "local"
    assert cfg["file_mounts"]["~/icl-study"] == "."
    assert {"**/.git", "/.venv/", "/results/"} <= set(cfg["rsync_exclude"])
    setup = [parse(line) for line in cfg["setup_commands"]]
    (make_venv,) = setup[0]
    assert make_venv.argv[:3] == ["python3.11", "-m", "venv"] and len(make_venv.argv) == 4
    venv = make_venv.argv[3]
    installs = {i: c.argv[2:] for i, cmds in enumerate(setup) for c in cmds if c.argv[:2] == [f"{venv}/bin/pip", "install"]}
    reqs = {i: [Requirement(a) for a in args if not a.startswith(("-", "~", "/", "."))] for i, args in installs.items()}
    torch = next(i for i, rs in reqs.items() if any(r.name == "torch" and [s.operator for s in r.specifier] == ["=="] for r in rs))  # pinned
    project = next(i for i, args in installs.items() if args == ["-e", "~/icl-study"])
    assert torch < project, "torch is pinned before the project, which only asks for torch>=2.4"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        stop, start = (parse(line) for line in cfg[key])
        assert [c.argv for c in stop] == [[f"{venv}/bin/ray", "stop"]]
        at = next(j for j, c in enumerate(start) if c.argv[:2] == [f"{venv}/bin/ray", "start"])
        assert any(c.is_("ulimit", "-n") and int(c.argv[2]) >= 65536 for c in start[:at]), cfg[key]
        assert start[at].env.get("RAY_AUTH_MODE") == "token", cfg[key]


# ---- `ray up` for real, over SSH to this machine ------------------------------------------------


def _ray_processes(home: Path | None = None) -> list[tuple[int, str]]:
    """Processes that `ray stop` would end, matched as `ray stop` matches them; with `home`, those
    started by the test's head (their HOME is its head home)."""
    import importlib

    from ray.autoscaler._private.constants import RAY_PROCESSES  # importing ray puts its own psutil (ray/thirdparty_files) on sys.path

    psutil = importlib.import_module("psutil")

    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.info["pid"] == os.getpid():
            continue
        name, args = proc.info["name"] or "", subprocess.list2cmdline(proc.info["cmdline"] or [])
        if any(key in (name if by_name else args) for key, by_name in RAY_PROCESSES):
            try:
                if home is not None and proc.environ().get("HOME") != str(home):
                    continue
            except psutil.Error:
                continue
            found.append((proc.info["pid"], args[:120]))
    return found


def _requirements() -> tuple[str, str]:
    """(sshd, directory holding python3.11) or a skip with the reason."""
    sshd = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)
    missing = [name for name, found in (("sshd", sshd), ("rsync", shutil.which("rsync")), ("ssh", shutil.which("ssh")), ("ssh-keygen", shutil.which("ssh-keygen"))) if not found]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: apt-get install openssh-server openssh-client rsync (Debian/Ubuntu)")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        pytest.skip("sshd run as root needs its privilege-separation directory: mkdir -p -m 0755 /run/sshd")
    base = Path(getattr(sys, "_base_executable", sys.executable)).parent
    if not (base / "python3.11").exists() and not shutil.which("python3.11"):
        pytest.skip("clusters/local-ssh.yaml builds its venv with python3.11, which this machine lacks")
    busy = _ray_processes()
    if busy:
        pytest.skip(f"Ray already runs here ({len(busy)} processes, e.g. pid {busy[0][0]}): `ray up`/`ray down` run `ray stop`, which would end them")
    return sshd, str(base)


def _sh(cmd: list[str], log: Path, timeout: float, **kw) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kw).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    return rc, log.read_text(errors="replace"), time.perf_counter() - t0


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).splitlines()[-n:])


def _last(output: str, label: str) -> str:
    """The rest of the last output line with `label` (ray exec may prefix lines and colour them)."""
    found = re.findall(rf"{re.escape(label)}(.*)", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output))
    assert found, f"no `{label}` line in:\n{_tail(output)}"
    return found[-1].strip()


def _done(output: str) -> dict[str, int]:
    """The counts of `icl-study run`'s summary, `done: 8 ok, 0 diverged, 0 failed of 8 runs; ...`."""
    counts, _, _ = _last(output, "done: ").partition(";")
    return {name: int(n) for n, name in re.findall(r"(\d+) (ok|diverged|failed|runs)\b", counts)}


def _rows(output: str) -> dict[str, int]:
    """`icl-study status`'s rows line, `rows: trials 8, curves 24, ...`, as {table: rows}."""
    return {table: int(n) for table, n in (item.split() for item in _last(output, "rows: ").split(", "))}


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
def test_ray_up_run_status_down_over_ssh(tmp_path):
    sshd, python_dir = _requirements()
    head_home, client_home, store = tmp_path / "head-home", tmp_path / "client-home", tmp_path / "store"
    for d in (head_home / ".config" / "pip", client_home):
        d.mkdir(parents=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("host_key", "id_test"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "id_test.pub").read_text())

    # the head is this machine: give its shells this machine's Python and package sources
    (head_home / ".bashrc").write_text(f'export PATH="{python_dir}:$PATH"\n')
    for conf in (Path.home() / ".config" / "pip" / "pip.conf", Path.home() / ".pip" / "pip.conf"):
        if conf.is_file():
            dst = head_home / conf.relative_to(Path.home())
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(conf, dst)
    forward = {k: v for k, v in os.environ.items() if (k.startswith("PIP_") or k.lower() in ("http_proxy", "https_proxy", "no_proxy")) and '"' not in v}
    setenv = " ".join(f'"{k}={v}"' for k, v in {"HOME": str(head_home), **forward}.items())
    sshd_config = keys / "sshd_config"
    sshd_config.write_text(
        f"HostKey {keys / 'host_key'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\nStrictModes no\nUsePAM no\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nPidFile none\nSetEnv {setenv}\n"
    )
    proxy = f"{sshd} -i -f {sshd_config}"
    probe = subprocess.run(
        ["ssh", "-i", str(keys / "id_test"), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", f"ProxyCommand={proxy}", f"{getpass.getuser()}@127.0.0.1", "echo $HOME"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.returncode == 0 and probe.stdout.strip() == str(head_home), f"ssh through `sshd -i` failed: {probe.stderr}"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    env.update(HOME=str(client_home), RAY_USAGE_STATS_ENABLED="0")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)  # the documented step
    token = client_home / ".ray" / "auth_token"
    token.chmod(0o600)

    cfg = yaml.safe_load(LOCAL_SSH.read_text())
    cfg["cluster_name"] = "icl-study-test"
    cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])  # one node: the local provider keys nodes by address
    cfg["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(keys / "id_test"), "ssh_proxy_command": proxy}
    cluster_file = write(tmp_path, cfg)
    sweep = tmp_path / "cluster-smoke.yaml"
    sweep.write_text(yaml.safe_dump(SMOKE))
    state = [Path("/tmp/ray") / f"cluster-icl-study-test.{ext}" for ext in ("state", "lock")]
    for p in state:
        p.unlink(missing_ok=True)

    times, logs = {}, tmp_path / "logs"
    logs.mkdir()
    record = ["--log-style", "record"]
    try:
        rc, out, times["up"] = _sh([*CLI, "cluster", "up", str(cluster_file), "--", "--no-config-cache", *record], logs / "up.log", 1200, cwd=ROOT, env=env)
        assert rc == 0, f"`icl-study cluster up` failed ({rc}):\n{_tail(out)}"

        run = f"icl-study run {sweep} --address auto --store {store}"
        rc, out, times["run"] = _sh([RAY, "exec", str(cluster_file), run, "--no-config-cache", *record], logs / "run.log", 600, cwd=ROOT, env=env)
        assert rc == 0 and _done(out) == {"ok": 8, "diverged": 0, "failed": 0, "runs": 8}, f"`ray exec '{run}'` failed ({rc}):\n{_tail(out)}"

        rc, out, times["status"] = _sh([RAY, "exec", str(cluster_file), f"icl-study status --store {store}", "--no-config-cache", *record], logs / "status.log", 300, cwd=ROOT, env=env)
        assert rc == 0 and names(out, "cluster-smoke") and _rows(out)["trials"] == 8, f"`icl-study status` failed ({rc}):\n{_tail(out)}"

        # the cluster enforces the token: with it (mode and path set) `ray status` answers, with another it is refused
        status = [RAY, "status", "--address", "127.0.0.1:6379"]
        good = subprocess.run(status, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}, capture_output=True, text=True, timeout=120)
        assert good.returncode == 0, good.stdout + good.stderr
        bad = subprocess.run(status, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 32}, capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and names(bad.stdout + bad.stderr, "InvalidAuthToken"), bad.stdout + bad.stderr  # the error's type

        trials = pd.read_parquet(store / "trials")
        assert len(trials) == 8 and trials.run_id.is_unique and set(trials.status) == {"ok"}, trials[["run_id", "status"]]
        assert set(trials.sweep) == {"cluster-smoke"}
    finally:
        rc_down, out_down, times["down"] = _sh([*CLI, "cluster", "down", str(cluster_file), "--", *record], logs / "down.log", 300, cwd=ROOT, env=env)
        time.sleep(1)
        left = _ray_processes(home=head_home)
        for pid, _ in left:  # only processes of this test's head, by pid
            os.kill(pid, 9)
        for p in state:
            p.unlink(missing_ok=True)
        for cache in Path("/tmp").glob("ray-config-*"):  # `ray down` caches the resolved config
            if '"icl-study-test"' in cache.read_text(errors="replace"):
                cache.unlink(missing_ok=True)
        shutil.rmtree(head_home / "icl-study-venv", ignore_errors=True)  # ~2 GB
        print("cluster test times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    assert rc_down == 0, f"`icl-study cluster down` failed ({rc_down}):\n{_tail(out_down)}"
    assert not left, f"Ray processes left after `ray down`: {left}"
