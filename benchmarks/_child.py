"""The command line every benchmark child shares: which contender, and where the emulator is."""

from __future__ import annotations

import argparse


def child_parser(description: str, contenders: tuple[str, ...]) -> argparse.ArgumentParser:
    """An argument parser with the options common to all children."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--contender", choices=contenders, required=True)
    parser.add_argument("--base-url", required=True, help="the emulator's API URL, ending in /v1")
    parser.add_argument("--api-key", required=True)
    return parser


def host_of(base_url: str) -> str:
    """The bare host URL the official SDK 3.x wants (it adds /v1 itself)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
