"""Describe the machine a benchmark runs on: CPU, cores, RAM, load, Python and library versions.

Everything here is read once by the runner and written at the top of RESULTS.md, so a figure is
never separated from the hardware and versions it was measured with.
"""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata

import psutil

_PACKAGES = ("together_async", "together", "aiohttp", "orjson", "httpx", "cattrs", "anyio")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict[str, str]:
    """The facts a reader needs to judge the figures, as label -> value."""
    memory = psutil.virtual_memory()
    load_1m, load_5m, _ = os.getloadavg()
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": _cpu_model(),
        "cores": f"{psutil.cpu_count()} logical / {psutil.cpu_count(logical=False)} physical",
        "RAM": f"{memory.total / 2**30:.1f} GiB",
        "load average at start": f"{load_1m:.2f} (1 min), {load_5m:.2f} (5 min)",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
    }
    for package in _PACKAGES:
        facts[package] = _version(package)
    return facts
