"""A fake model server for benchmarks: Ollama's /api/chat on a bare asyncio socket server.

Small on purpose, so that it is never what a benchmark measures: HTTP/1.1 keep-alive, one
answer per request after ``--latency`` milliseconds, NDJSON when the request streams. It keeps
what the benchmarks read back at ``GET /stats``: its own CPU time, calls, the time calls
spent in flight (to compute how busy the model slots were), the peak in flight. ``POST
/reset`` clears them.

    python benchmarks/fake_model.py --port 11500 --latency 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

ANSWER = "A short summary of the text."


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.busy_seconds = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "calls": self.calls,
            "max_in_flight": self.max_in_flight,
            "busy_seconds": self.busy_seconds,
            "first_start": self.first_start,
            "last_end": self.last_end,
            # This process's CPU so far: what the fake model cost a benchmark's 2 cores.
            "cpu_seconds": time.process_time(),
        }


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _chat(body: bytes, latency: float, stats: Stats) -> bytes:
    request = json.loads(body)
    started = time.time()
    stats.calls += 1
    stats.in_flight += 1
    stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
    stats.first_start = stats.first_start or started
    try:
        if latency:
            await asyncio.sleep(latency)
    finally:
        stats.in_flight -= 1
        ended = time.time()
        stats.busy_seconds += ended - started
        stats.last_end = ended
    took = int((ended - started) * 1e9)
    done = {
        "model": request.get("model", "fake"),
        "done": True,
        "done_reason": "stop",
        "total_duration": took,
        "load_duration": 0,
        "prompt_eval_count": 20,
        "prompt_eval_duration": 0,
        "eval_count": 6,
        "eval_duration": took,
    }
    message = {"role": "assistant", "content": ANSWER}
    if request.get("stream", True):
        lines = [
            {"model": done["model"], "done": False, "message": message},
            {**done, "message": {"role": "assistant", "content": ""}},
        ]
        payload = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return _response("200 OK", payload, "application/x-ndjson")
    return _response("200 OK", json.dumps({**done, "message": message}).encode())


async def _serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency: float, stats: Stats
) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            body = await reader.readexactly(length) if length else b""
            if method == "POST" and path == "/api/chat":
                out = await _chat(body, latency, stats)
            elif path == "/api/version":
                out = _response("200 OK", b'{"version": "0.0.0-bench"}')
            elif path == "/api/tags":
                out = _response("200 OK", b'{"models": [{"name": "llama3.2:latest"}]}')
            elif path == "/stats":
                out = _response("200 OK", json.dumps(stats.as_dict()).encode())
            elif path == "/reset":
                stats.reset()
                out = _response("200 OK", b"{}")
            else:
                out = _response("404 Not Found", b'{"error": "not found"}')
            writer.write(out)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0, help="milliseconds per call")
    args = parser.parse_args()
    stats = Stats()
    latency = args.latency / 1000

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(reader, writer, latency, stats)

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())
