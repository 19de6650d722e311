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

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SSH = ROOT / "clusters" / "local-ssh.yaml"
CLUSTER_YAML = ROOT / "cluster.yaml"
RAY = str(Path(sys.executable).parent / "ray")
CLI = [sys.executable, "-c", "from pipelines.cli import app; app()"]

SMOKE = {
    "name": "cluster-smoke",
    "family": "gmm",
    "fixed": {"d": 2, "snr": 1.5, "lr": 0.5, "steps": 20, "log_every": 10, "B": 256, "M": [8, "inf"], "n_eval": 64},
    "grid": {"c": [2, 3], "N": [5, 20]},
    "seeds": 2,
    "bundle_size": 4,
}


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
    return CliRunner().invoke(launch.app, [str(a) for a in args])


def one_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icl-study: error: "), result.stderr
    return lines[0]


# ---- offline: the shipped files and the checks -------------------------------------------------


def test_hooked_into_the_cli():
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["cluster", "check", str(LOCAL_SSH)])
    assert "placeholders left" in one_error(result)


def test_shipped_local_ssh_names_its_placeholders():
    msg = one_error(cluster("check", LOCAL_SSH))
    for where in ("provider.head_ip", "provider.worker_ips[0]", "auth.ssh_user", "auth.ssh_private_key"):
        assert f"{where} (EDIT-ME)" in msg, msg


def test_shipped_cluster_yaml_names_its_placeholders():
    msg = one_error(cluster("check", CLUSTER_YAML))
    assert "provider.head_ip (192.0.2.10, a documentation address)" in msg, msg


@pytest.mark.parametrize("path", [LOCAL_SSH, CLUSTER_YAML], ids=lambda p: p.name)
def test_filled_in_copy_passes(tmp_path, path):
    result = cluster("check", write(tmp_path, fill(path)))
    assert result.exit_code == 0, result.output
    assert "ok (head 10.0.0.1, 2 workers" in result.output
    assert "token auth, ~/.ray/icl-study.token on the nodes from ~/.ray/auth_token" in result.output


def _edit(cfg: dict, key: str, i: int, old: str, new: str) -> dict:
    assert old in cfg[key][i], cfg[key][i]
    cfg[key][i] = cfg[key][i].replace(old, new)
    return cfg


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: _edit(c, "worker_start_ray_commands", 1, "RAY_AUTH_MODE=token ", ""), "worker_start_ray_commands[1]: `ray start` without RAY_AUTH_MODE"),
        (lambda c: _edit(c, "head_start_ray_commands", 1, "icl-study.token", "other.token"), "RAY_AUTH_TOKEN_PATH differs between commands"),
        (lambda c: _edit(c, "worker_start_ray_commands", 1, "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled"), "RAY_AUTH_MODE differs between commands"),
        (lambda c: {**c, "file_mounts": {"~/icl-study": "."}}, "is not a file_mounts destination"),
        (lambda c: {**c, "setup_commands": [s for s in c["setup_commands"] if "icl-study.env" not in s or "source" in s]}, "setup_commands do not export RAY_AUTH_MODE=token"),
        (lambda c: {**c, "setup_commands": [*c["setup_commands"], "echo export RAY_AUTH_TOKEN=0123abcd >> ~/.bashrc"]}, "puts a secret in the file"),
    ],
    ids=["start-without-mode", "two-token-paths", "two-modes", "token-not-delivered", "no-env-for-exec", "raw-token"],
)
def test_inconsistent_token_auth_is_refused(tmp_path, change, expected):
    msg = one_error(cluster("check", write(tmp_path, change(fill(LOCAL_SSH)))))
    assert expected in msg, msg


def test_what_ray_rejects_is_refused_in_one_line(tmp_path):
    msg = one_error(cluster("check", write(tmp_path, fill(LOCAL_SSH, head_node_type="x", available_node_types={"x": {"node_config": {}, "resources": {}}}))))
    assert "Ray rejects it" in msg and "on-premise" in msg, msg
    msg = one_error(cluster("check", write(tmp_path, fill(LOCAL_SSH, max_worker=2))))
    assert "Ray rejects it at the top level" in msg and "max_worker" in msg, msg


def test_up_refuses_before_running_anything(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda *a, **k: calls.append(a) or 0)
    monkeypatch.setattr(launch.shutil, "which", lambda tool: f"/usr/bin/{tool}")  # ssh and rsync need not be here
    one_error(cluster("up", LOCAL_SSH))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token there
    monkeypatch.chdir(ROOT)
    filled = write(tmp_path, fill(LOCAL_SSH))
    assert "create it with `ray get-auth-token --generate`" in one_error(cluster("up", filled))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("0" * 32)
    (tmp_path / ".ray" / "auth_token").chmod(0o600)
    monkeypatch.chdir(tmp_path)
    assert "not the icl-study repository: run from the repository root" in one_error(cluster("up", filled))
    assert calls == []
    monkeypatch.chdir(ROOT)
    result = cluster("up", filled, "--", "--no-config-cache")
    assert result.exit_code == 0 and calls == [([RAY, "up", "-y", str(filled), "--no-config-cache"],)], (result.output, calls)


def test_local_ssh_installs_into_its_own_venv():
    cfg = yaml.safe_load(LOCAL_SSH.read_text())
    assert "docker" not in cfg and cfg["provider"]["type"] == "local"
    assert cfg["file_mounts"]["~/icl-study"] == "."
    assert {"**/.git", "/.venv/", "/results/"} <= set(cfg["rsync_exclude"])
    setup = cfg["setup_commands"]
    venv = re.match(r"python3\.11 -m venv (\S+)$", setup[0]).group(1)
    torch = next(i for i, c in enumerate(setup) if re.search(r"pip install torch==\d", c))
    project = setup.index(f"{venv}/bin/pip install -e ~/icl-study")
    assert torch < project, "torch is pinned before the project, which only asks for torch>=2.4"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        stop, start = cfg[key]
        assert stop == f"{venv}/bin/ray stop"
        before, _, _ = start.partition(f"{venv}/bin/ray start")
        assert "ulimit -n 65536" in before and "RAY_AUTH_MODE=token" in before, start


# ---- `ray up` for real, over SSH to this machine ------------------------------------------------


def _ray_processes(home: Path | None = None) -> list[tuple[int, str]]:
    """Processes that `ray stop` would end, matched as `ray stop` matches them; with `home`, those
    started by the test's head (their HOME is its head home)."""
    import psutil  # Ray's own copy (ray/thirdparty_files), on sys.path once ray is imported
    from ray.autoscaler._private.constants import RAY_PROCESSES

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


@pytest.mark.cluster
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
        assert rc == 0 and "done: 8 ok, 0 diverged, 0 failed of 8 runs" in out, f"`ray exec '{run}'` failed ({rc}):\n{_tail(out)}"

        rc, out, times["status"] = _sh([RAY, "exec", str(cluster_file), f"icl-study status --store {store}", "--no-config-cache", *record], logs / "status.log", 300, cwd=ROOT, env=env)
        assert rc == 0 and "cluster-smoke" in out and "trials 8" in out, f"`icl-study status` failed ({rc}):\n{_tail(out)}"

        # the cluster enforces the token: with it (mode and path set) `ray status` answers, with another it is refused
        status = [RAY, "status", "--address", "127.0.0.1:6379"]
        good = subprocess.run(status, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}, capture_output=True, text=True, timeout=120)
        assert good.returncode == 0 and "Autoscaler status" in good.stdout, good.stdout + good.stderr
        bad = subprocess.run(status, env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 32}, capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and "InvalidAuthToken" in bad.stdout + bad.stderr, bad.stdout + bad.stderr

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
