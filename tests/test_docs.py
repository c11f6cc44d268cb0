"""Every code block of README.md and docs/*.md runs as written, against an emulator.

The rules the docs follow (and this module enforces):

- Every fence has an info string. `python` and `bash` blocks run; the rest (`text` for output
  and synopses, `json`, ...) are shown, not run.
- A `python` block is a script (plain Python, `asyncio.run(main())`) unless the line before it
  says "In a notebook cell": then it runs with top-level await, as IPython runs a cell.
- A `bash` block runs under `bash -eo pipefail`. A fresh-machine block's leading
  `python3 -m venv .venv && . .venv/bin/activate && pip install -e ... && ` is taken as done:
  the suite runs inside that installed environment.
- Blocks that cannot run here are preceded by `<!-- not run: REASON -->`, and there are few.
- Each block runs in its own temporary directory holding `examples/` (the checkout's, as the
  docs are read from a checkout), with TOGETHER_BASE_URL / TOGETHER_API_KEY naming a served
  emulator (`together-async serve`), so code written for Together (`AsyncTogether()` reading
  the environment) runs unchanged.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API_KEY = "docs-test-key"
RUN_LANGUAGES = frozenset({"python", "bash"})
SHOWN_LANGUAGES = frozenset({"text", "json"})
MAX_NOT_RUN = 3
STARTUP_TIMEOUT = 30.0
BLOCK_TIMEOUT = 120.0

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
NOTEBOOK_LABEL = re.compile(r"in a notebook cell", re.IGNORECASE)
SETUP_PREFIX = re.compile(
    r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e \S+ && "
)


@attrs.frozen
class Block:
    """One fenced code block: where it is, its info string, its text and what precedes it."""

    path: Path
    line: int  # of the opening fence, 1-based
    info: str
    code: str
    lead: str  # the last non-blank line before the fence

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info else ""

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def source(self) -> str:
        """The code, shifted so that its line numbers are the Markdown file's (for tracebacks)."""
        return "\n" * self.line + self.code

    @property
    def filename(self) -> str:
        return str(self.path.relative_to(ROOT))

    @property
    def not_run_reason(self) -> str | None:
        match = NOT_RUN.match(self.lead)
        return match["reason"] if match else None

    @property
    def is_notebook_cell(self) -> bool:
        return bool(NOTEBOOK_LABEL.search(self.lead))


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (CommonMark fences: ``` or ~~~, maybe indented).

    An unclosed fence raises ValueError rather than swallowing the rest of the file.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    lead = ""
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            if lines[index].strip():
                lead = lines[index].strip()
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        closing = re.compile(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            text = lines[end]
            body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{index + 1}: the fence opened here is never closed")
        code = "\n".join(body) + "\n"
        blocks.append(Block(path, index + 1, opening["info"].strip(), code, lead))
        lead = ""
        index = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOC_FILES for block in parse_blocks(path)]


def _params(language: str) -> list[Any]:
    params = []
    for block in ALL_BLOCKS:
        if block.language != language:
            continue
        reason = block.not_run_reason
        marks = [pytest.mark.skip(reason=f"not run: {reason}")] if reason else []
        params.append(pytest.param(block, id=block.id, marks=marks))
    return params


def test_parser_reads_indented_fences_labels_and_markers(tmp_path: Path) -> None:
    """The parser finds indented and tilde fences, their info, their lead line and markers."""
    page = tmp_path / "page.md"
    page.write_text(
        "Intro.\n\n<!-- not run: needs a key -->\n```bash\necho hi\n```\n"
        "- a list item:\n\n  ```text\n  shown\n  ```\n"
        "In a notebook cell:\n~~~~python\nawait f()\n```\n~~~~\n"
    )
    blocks = parse_blocks(page)
    assert [(b.line, b.language, b.code) for b in blocks] == [
        (4, "bash", "echo hi\n"),
        (9, "text", "shown\n"),
        (13, "python", "await f()\n```\n"),
    ]
    assert blocks[0].not_run_reason == "needs a key" and blocks[1].not_run_reason is None
    assert blocks[2].is_notebook_cell and not blocks[0].is_notebook_cell


def test_parser_refuses_an_unclosed_fence(tmp_path: Path) -> None:
    """A fence never closed is an error, not a block that swallows the rest of the page."""
    page = tmp_path / "page.md"
    page.write_text("```python\nprint(1)\n")
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks(page)


# -- a served emulator and a workspace per block -------------------------------------------------


class ServedEmulator:
    """`together-async serve --port 0` in a subprocess, requiring API_KEY; stopped with SIGINT."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "together-async"),
                "serve",
                "--port",
                "0",
                "--api-key",
                API_KEY,
                "--data-dir",
                str(data_dir),
            ],
            env=_env_without_together(),
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        stdout = self.process.stdout
        threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
        try:
            ready = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            self.stop()
            raise RuntimeError("the emulator did not report ready in time") from None
        fields = dict(part.split("=", 1) for part in ready.split() if "=" in part)
        self.base_url = fields["base_url"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.log.close()


def _env_without_together() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if not name.startswith("TOGETHER_")}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedEmulator]:
    """One emulator for every block of the module (each block makes its own files and jobs)."""
    directory = tmp_path_factory.mktemp("docs-emulator")
    server = ServedEmulator(directory / "data", directory / "serve.log")
    yield server
    server.stop()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A fresh directory that looks like a checkout to the docs: it has `examples/`."""
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    return tmp_path


def _block_env(served: ServedEmulator) -> dict[str, str]:
    env = _env_without_together()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TOGETHER_BASE_URL"] = served.base_url
    env["TOGETHER_API_KEY"] = API_KEY
    return env


# -- the docs' shape -----------------------------------------------------------------------------


def test_every_fence_says_what_it_holds() -> None:
    """Every fenced block has an info string naming a language this module knows."""
    unknown = [
        f"{block.id}: {block.info!r}"
        for block in ALL_BLOCKS
        if block.language not in RUN_LANGUAGES | SHOWN_LANGUAGES
    ]
    assert not unknown, "blocks without a known language: " + ", ".join(unknown)


def test_blocks_not_run_are_rare_and_explained() -> None:
    """At most a few blocks are marked `not run`, each with a reason, and only runnable ones."""
    marked = [block for block in ALL_BLOCKS if block.not_run_reason is not None]
    assert len(marked) <= MAX_NOT_RUN, [block.id for block in marked]
    assert all(block.not_run_reason for block in marked)
    assert all(block.language in RUN_LANGUAGES for block in marked), [b.id for b in marked]


@pytest.mark.parametrize("block", _params("python"))
def test_python_block_is_a_script_or_a_labelled_cell(block: Block) -> None:
    """A python block is plain Python that runs its own loop, or is labelled a notebook cell."""
    if block.is_notebook_cell:
        compile(block.source, block.filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        return
    try:
        tree = ast.parse(block.source, block.filename)
    except SyntaxError as exc:
        pytest.fail(f"{block.id} is not plain Python (label it a notebook cell?): {exc}")
    defines_main = any(
        isinstance(node, ast.AsyncFunctionDef) and node.name == "main" for node in tree.body
    )
    if defines_main:
        assert "asyncio.run(main())" in block.code, f"{block.id} defines main() but never runs it"


# -- running the blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("block", _params("python"))
def test_python_block_runs(
    block: Block, served: ServedEmulator, workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The python block runs to the end against the emulator (a cell with top-level await)."""
    for name, value in _block_env(served).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(workspace)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    if block.is_notebook_cell:
        code = compile(block.source, block.filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        result = eval(code, namespace)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    else:
        exec(compile(block.source, block.filename, "exec"), namespace)
    del namespace
    # An unclosed session or file is reported when it is collected: make that happen here.
    gc.collect()


@pytest.mark.parametrize("block", _params("bash"))
def test_bash_block_runs(block: Block, served: ServedEmulator, workspace: Path) -> None:
    """The bash block exits 0 against the emulator, warning of nothing, leaving no process."""
    script = SETUP_PREFIX.sub("", block.code)
    process = subprocess.Popen(
        ["bash", "-eo", "pipefail", "-c", script],
        cwd=workspace,
        env=_block_env(served),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    # The block's own process group: anything it started and left running.
    try:
        os.killpg(process.pid, signal.SIGKILL)
        leftover = True
    except ProcessLookupError:
        leftover = False
    assert process.returncode == 0, f"exit {process.returncode}\n{stdout}\n{stderr}"
    assert not leftover, f"{block.id} left a process running"
    assert not re.search(r"Traceback|Warning|Unclosed", stderr), stderr
