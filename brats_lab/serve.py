"""Run a local server (the MLflow UI, the dashboard) in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


def run_foreground(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> int:
    """Start `cmd` and wait for it; returns its exit status (0 after Ctrl-C).

    SIGTERM is passed on so no server is left behind; Ctrl-C reaches the server from the terminal
    as well, so it is given time to stop by itself.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
