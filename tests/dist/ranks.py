"""Start N gloo ranks of a script the way `deepspeed`/torchrun do (same environment variables),
each in its own session with one thread, on a free port; bounded in time; nothing left behind."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from magneto_dist.launch_env import ROOT


def free_port() -> int:
    """A port nobody listens on now; parallel test runs each get their own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, extra: Optional[dict] = None) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


@dataclass
class RankResult:
    returncode: int
    output: str


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_ranks(args: List[str], world: int, extra_env: Optional[dict] = None,
                port: Optional[int] = None) -> List[subprocess.Popen]:
    port = port or free_port()
    return [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=rank_env(r, world, port,
                                                                             extra_env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for r in range(world)]


def wait_ranks(procs: List[subprocess.Popen], timeout: float) -> List[RankResult]:
    """Wait for all ranks; on timeout kill every rank's process group and fail loudly."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(RankResult(proc.returncode, out))
    except subprocess.TimeoutExpired:
        outputs = []
        for proc in procs:
            kill_group(proc)
            out, _ = proc.communicate()
            outputs.append(out[-3000:])
        raise AssertionError(f"ranks did not finish within {timeout}s; last output:\n"
                             + "\n----\n".join(outputs))
    finally:
        for proc in procs:
            kill_group(proc)  # a rank's own children (loader workers) go too
    return results


def run_ranks(args: List[str], world: int, timeout: float = 240,
              extra_env: Optional[dict] = None) -> List[RankResult]:
    return wait_ranks(start_ranks(args, world, extra_env), timeout)


def once(cache: Dict, key, make: Callable):
    """cache[key] = make(), made once for every test that shares it; an AssertionError (ranks
    that failed) is kept and raised again to each of them, never retried."""
    if key not in cache:
        try:
            cache[key] = make()
        except AssertionError as failed:
            cache[key] = failed
    if isinstance(cache[key], AssertionError):
        raise cache[key]
    return cache[key]
