"""A small web service on one AsyncTogether client: submit a batch, follow it, stream its results.

    python examples/web_service.py --emulator      # an in-process emulator: no key, no network
    python examples/web_service.py                 # Together: TOGETHER_API_KEY (TOGETHER_BASE_URL)

Routes (JSON in and out):

    POST /batches                a JSON list of requests -> 201 {"id": ..., "status": ...}
                                 (request lines {"custom_id", "body"} or bare bodies; ?endpoint=)
    GET  /batches/{id}           the job's status; ?wait=SECONDS holds the answer until the job
                                 ends or that time passes
    GET  /batches/{id}/results   every result as NDJSON (one JSON object a line), streamed

The client is opened once in the app's lifespan (`cleanup_ctx`) and shared by every request: one
connection pool, closed when the app shuts down.

    curl -s localhost:8080/batches \
        -d '[{"model": "m", "messages": [{"role": "user", "content": "hi"}]}]'
    curl -s 'localhost:8080/batches/ID?wait=60'
    curl -s localhost:8080/batches/ID/results
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from together_async import (
    APIStatusError,
    AsyncTogether,
    BatchEndpoint,
    BatchFileError,
    BatchJob,
    BatchResult,
    InvalidArgumentError,
    WaitTimeoutError,
)
from together_async.emulator import Emulator

logger = logging.getLogger("web_service")

CLIENT = web.AppKey("client", AsyncTogether)
POLL_INTERVAL = web.AppKey("poll_interval", float)
MAX_WAIT = 300.0  # seconds a status request may be held (?wait=)


def job_json(job: BatchJob) -> dict[str, Any]:
    """What the service tells about a job."""
    return {
        "id": job.id,
        "status": str(job.status.value) if job.status is not None else None,
        "progress": job.progress,
        "request_counts": job.request_counts,
        "output_file_id": job.output_file_id,
        "error_file_id": job.error_file_id,
        "error": job.error,
    }


def result_json(result: BatchResult) -> dict[str, Any]:
    """One result line: the response body for a success, the error for a failure."""
    row: dict[str, Any] = {"custom_id": result.custom_id, "status_code": result.status_code}
    if result.ok:
        row["body"] = result.body
    else:
        row["error"] = {"message": result.error_message, "code": result.error_code}
    return row


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def batch_lines(requests: Any) -> bytes:
    """A batch input file from a JSON list of request lines or bare bodies (custom_id by index)."""
    if not isinstance(requests, list) or not requests:
        raise ValueError("send a non-empty JSON list of requests")
    lines = []
    for index, item in enumerate(requests):
        if not isinstance(item, dict):
            raise ValueError(f"requests[{index}]: must be a JSON object")
        line = item if "body" in item else {"custom_id": f"request-{index}", "body": item}
        lines.append(orjson.dumps(line))
    return b"\n".join(lines) + b"\n"


async def submit(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    try:
        data = batch_lines(await request.json(loads=orjson.loads))
    except (ValueError, orjson.JSONDecodeError) as exc:
        return json_error(400, str(exc))
    try:
        endpoint = BatchEndpoint(request.query.get("endpoint", BatchEndpoint.CHAT_COMPLETIONS))
    except ValueError:
        known = ", ".join(member.value for member in BatchEndpoint)
        return json_error(400, f"endpoint: one of {known}")
    try:
        # The file is validated before upload: a bad request line is the caller's 400.
        uploaded = await client.files.upload(file=data, filename="web-service.jsonl")
        job = await client.batches.create_batch(uploaded.id, endpoint)
    except (BatchFileError, InvalidArgumentError) as exc:
        return json_error(400, str(exc))
    return web.json_response(job_json(job), status=201, dumps=_dumps)


async def status(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    batch_id = request.match_info["id"]
    try:
        wait = min(float(request.query.get("wait", "0")), MAX_WAIT)
    except ValueError:
        return json_error(400, "wait: a number of seconds")
    try:
        if wait > 0:
            job = await client.batches.wait(
                batch_id,
                timeout=wait,
                poll_interval=request.app[POLL_INTERVAL],
                max_interval=max(request.app[POLL_INTERVAL], 5.0),
            )
        else:
            job = await client.batches.get_batch(batch_id)
    except WaitTimeoutError as exc:
        if exc.last_job is None:
            return json_error(504, f"no answer about {batch_id} within {wait} s")
        job = exc.last_job
    except APIStatusError as exc:
        return json_error(exc.status_code, exc.message)
    return web.json_response(job_json(job), dumps=_dumps)


async def results(request: web.Request) -> web.StreamResponse:
    client = request.app[CLIENT]
    batch_id = request.match_info["id"]
    try:
        job = await client.batches.get_batch(batch_id)
    except APIStatusError as exc:
        return json_error(exc.status_code, exc.message)
    if not job.is_terminal:
        return json_error(409, f"batch {batch_id} is {job_json(job)['status']}: wait for it to end")
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    try:
        async for result in client.batches.results(job):
            await response.write(orjson.dumps(result_json(result)) + b"\n")
    except Exception:
        # The status line is sent: the best the caller can get is a cut-short stream. Log why.
        logger.exception("streaming the results of %s failed", batch_id)
        raise
    await response.write_eof()
    return response


def make_app(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    emulator: bool = False,
    poll_interval: float = 2.0,
) -> web.Application:
    """The service. With `emulator=True` it runs its own in-process emulator for its lifespan."""
    app = web.Application()
    app[POLL_INTERVAL] = poll_interval

    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        if emulator:
            async with Emulator(latency=0.01) as emu:
                async with AsyncTogether(base_url=emu.base_url, api_key=emu.api_key) as client:
                    app[CLIENT] = client
                    yield
        else:
            async with AsyncTogether(api_key, base_url=base_url) as client:
                app[CLIENT] = client
                yield

    app.cleanup_ctx.append(lifespan)
    app.add_routes(
        [
            web.post("/batches", submit),
            web.get("/batches/{id}", status),
            web.get("/batches/{id}/results", results),
        ]
    )
    return app


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then shut down (the client is closed on the way out)."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        print(f"web service ready: http://{bound[0]}:{bound[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--emulator", action="store_true", help="run on an in-process emulator")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = make_app(emulator=args.emulator, poll_interval=0.2 if args.emulator else 2.0)
    asyncio.run(serve(app, args.host, args.port))


if __name__ == "__main__":
    main()
