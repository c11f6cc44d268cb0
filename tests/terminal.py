"""Run the CLI with its stderr on a pseudo-terminal, as a person at a terminal meets it."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import attrs

__all__ = ["TerminalRun", "cli_on_terminal"]


@attrs.frozen
class TerminalRun:
    """What a command did: its exit code, what the terminal showed, and its stdout."""

    returncode: int
    shown: str
    stdout: str


def cli_on_terminal(
    *args: str,
    cwd: Path,
    env: dict[str, str],
    columns: int = 80,
    rows: int = 24,
    timeout: float = 120.0,
) -> TerminalRun:
    """`python -m together_async ARGS` with stderr on a `columns` x `rows` pseudo-terminal
    and stdout piped, run to completion."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "together_async", *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=terminal, text=True,
    )  # fmt: skip
    os.close(terminal)
    drawn = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other end closed
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = process.communicate(timeout=timeout)
    finally:
        reader.join(timeout=10)
        os.close(controller)
    return TerminalRun(process.returncode, drawn.decode(errors="replace"), stdout)
