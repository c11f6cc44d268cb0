"""Input data for the benchmarks, generated deterministically: realistic chat batch files.

write_chat_batch_file(path, lines=50_000, line_bytes=2_000)   # ~100 MB, like a full batch
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import orjson

DEFAULT_MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"

# Prose with what real prompts carry: multi-byte UTF-8, quotes and newlines (escaped in JSON).
_WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which have "
    "not but all were when we there can more if no will one about so up out them been into "
    "summarise translate explain classify extract review report customer order invoice data "
    "model batch request latency throughput café naïve résumé façade Zürich São Paulo 東京 "
    'Ελληνικά русский 😀 — “quoted” "escaped" it\'s 42 3.14 2024-06-01 user@example.com'
).split()

_SYSTEM_PROMPT = "You are a careful assistant. Answer in at most three sentences."


def _corpus(rng: random.Random, chars: int) -> str:
    """Random prose of about `chars` characters, with sentence breaks and newlines."""
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        if rng.random() < 0.06:
            word += rng.choice((".", ".\n", ",", "?", ";"))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def chat_request_line(custom_id: str, content: str, *, model: str = DEFAULT_MODEL) -> bytes:
    """One batch request for /v1/chat/completions as JSON, without its newline."""
    return orjson.dumps(
        {
            "custom_id": custom_id,
            "body": {
                "model": model,
                "messages": [
                    {"role": "system", "content": _SYSTEM_PROMPT},
                    {"role": "user", "content": content},
                ],
                "max_tokens": 256,
                "temperature": 0.2,
            },
        }
    )


def write_chat_batch_file(
    path: str | os.PathLike[str],
    *,
    lines: int = 50_000,
    line_bytes: int = 2_000,
    model: str = DEFAULT_MODEL,
    seed: int = 0,
) -> int:
    """Write a valid chat batch input file of `lines` requests of about `line_bytes` each.

    Each line (newline included) is within a few bytes of `line_bytes`; the user message is a
    slice of generated prose. The same arguments always give the same file. Written to a temp
    file and renamed, so an interrupted run never leaves a truncated file behind.

    Returns:
        The file's size in bytes.
    """
    rng = random.Random(seed)
    corpus = _corpus(rng, 1_000_000)
    target = line_bytes - 1  # the newline
    overhead = len(chat_request_line(f"request-{lines:07d}", "", model=model))
    destination = Path(path)
    temporary = destination.with_name(destination.name + ".partial")
    size = 0
    with temporary.open("wb") as file:
        for index in range(lines):
            custom_id = f"request-{index:07d}"
            start = rng.randrange(len(corpus) - line_bytes)
            content = corpus[start : start + max(target - overhead, 0)]
            line = chat_request_line(custom_id, content, model=model)
            # Multi-byte characters and escapes make the line longer than its characters: trim.
            while len(line) > target and content:
                content = content[: -max(1, (len(line) - target) // 2)]
                line = chat_request_line(custom_id, content, model=model)
            file.write(line + b"\n")
            size += len(line) + 1
    temporary.replace(destination)
    return size
