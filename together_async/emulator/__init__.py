"""A local emulator of Together's files and batches API that runs batch jobs for real.

In process: `async with Emulator() as emu:` then point a client at `emu.base_url` with
`emu.api_key`. As a process: `python -m together_async.emulator` or `together-async serve`.
"""

from __future__ import annotations

from .app import EmulatorStats
from .engines import EchoEngine, Engine, EngineReply, OpenAIEngine
from .faults import Fault, FaultKind
from .server import Emulator, add_arguments, emulator_from_args, run_from_args, serve

__all__ = [
    "EchoEngine",
    "Emulator",
    "EmulatorStats",
    "Engine",
    "EngineReply",
    "Fault",
    "FaultKind",
    "OpenAIEngine",
    "add_arguments",
    "emulator_from_args",
    "run_from_args",
    "serve",
]
