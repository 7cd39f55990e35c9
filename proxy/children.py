"""The processes memshadow starts (shadow workers, the extra proxy processes of
`workers: N`): started on a private socketpair, and reaped without blocking the loop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Final

REAP_TIMEOUT: Final = 2.0  # seconds a child has to exit once told, before it is killed


def start_child(
    module: str, fds: tuple[int, ...] = ()
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """`python -P -m MODULE FD`, FD being its end of a new socketpair; returns the process
    and our end. `fds` are passed too (listen sockets). Its own process group: a Ctrl-C or
    a group SIGTERM is for the first process, which drains clients, then stops its
    children. -P: never import from the working directory."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", module, str(theirs.fileno())],
            pass_fds=(theirs.fileno(), *fds),
            stdin=subprocess.DEVNULL,
            close_fds=True,
            env=child_environment(),
            process_group=0,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


async def reap(process: subprocess.Popen[bytes]) -> int:
    """Wait for a child that was told to end (killing it after REAP_TIMEOUT)."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, process.wait, REAP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        return await loop.run_in_executor(None, process.wait)
    except asyncio.CancelledError:
        process.kill()
        raise


def child_environment() -> dict[str, str]:
    """The proxy's environment, with this very package importable (a source checkout run
    from another directory, a test runner's sys.path). An installed package is found by the
    interpreter anyway, and putting site-packages on PYTHONPATH would put it before the
    standard library."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    if root.name not in ("site-packages", "dist-packages"):
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(root) if not path else os.pathsep.join((str(root), path))
    return env


__all__ = ["child_environment", "reap", "start_child"]
