"""Killing a driver as a crash would: the whole session it started, and nothing else on the machine.

The driver is started with `start_new_session=True`, so it leads a session; Ray's processes that it
starts (GCS, raylet, workers) stay in that session. `ray stop --force` would end every Ray process on
the machine, including other users' and other tests'.
"""

import os
import signal
import subprocess
import time
from pathlib import Path


def session_members(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def kill_session(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGKILL the process group, wait for its leader, then any session member left, until none."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + timeout
    while (left := session_members(proc.pid)) and time.time() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
