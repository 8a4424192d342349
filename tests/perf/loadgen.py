"""The benchmark's own load generator, used when wrk is not installed: keep-alive HTTP/1.1 over raw asyncio
streams (uvloop when available), one coroutine per connection, each sending its next request as soon as the
previous answer is read (a closed loop, like wrk).

Run by bench.py as a separate process:

    python tests/perf/loadgen.py --url http://127.0.0.1:PORT/profile --tokens FILE --connections 32 --duration 10

It prints one JSON line: completed requests, elapsed seconds, non-2xx and socket error counts, and every
latency in microseconds (bench.py merges several processes' lists and takes the percentiles).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

HEADER_END = b"\r\n\r\n"
REQUEST_TIMEOUT = 10.0


@dataclass
class Tally:
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    latencies_us: list[int] = field(default_factory=list)


def build_requests(url: str, method: str, body: str | None, tokens: list[str]) -> tuple[str, int, list[bytes]]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    payload = body.encode() if body else b""
    requests = []
    for token in tokens:
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {host}:{port}",
            f"Authorization: Bearer {token}",
        ]
        if payload:
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        requests.append(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
    return host, port, requests


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; return its status and whether the server keeps the connection open."""
    head = await reader.readuntil(HEADER_END)
    status = int(head[9:12])
    length = 0
    keep_alive = True
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not expected from these endpoints")
    if length:
        await reader.readexactly(length)
    return status, keep_alive


async def connection(host: str, port: int, requests: list[bytes], start: int, deadline: float, tally: Tally) -> None:
    index = start
    count = len(requests)
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    clock = time.perf_counter
    while clock() < deadline:
        try:
            if writer is None or reader is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), REQUEST_TIMEOUT)
            index = (index + 1) % count
            began = clock()
            writer.write(requests[index])
            status, keep_alive = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT)
            tally.latencies_us.append(int((clock() - began) * 1_000_000))
            tally.requests += 1
            if not 200 <= status < 300:
                tally.non_2xx += 1
            if not keep_alive:
                writer.close()
                writer = reader = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            tally.socket_errors += 1
            if writer is not None:
                writer.close()
            writer = reader = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def run(args: argparse.Namespace, tokens: list[str]) -> dict[str, object]:
    host, port, requests = build_requests(args.url, args.method, args.body, tokens)
    tally = Tally()
    began = time.perf_counter()
    deadline = began + args.duration
    stride = max(1, len(requests) // max(1, args.connections))
    await asyncio.gather(
        *(
            connection(host, port, requests, args.offset + number * stride, deadline, tally)
            for number in range(args.connections)
        )
    )
    elapsed = time.perf_counter() - began
    return {
        "requests": tally.requests,
        "elapsed": elapsed,
        "non_2xx": tally.non_2xx,
        "socket_errors": tally.socket_errors,
        "latencies_us": tally.latencies_us,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--tokens", required=True, help="file with one bearer token a line")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default=None, help="JSON request body")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--offset", type=int, default=0, help="where in the token list to start")
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname not in {"127.0.0.1", "localhost", "::1"}:
        raise SystemExit("loadgen only drives a server on loopback")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    tokens = [line.strip() for line in Path(args.tokens).read_text().splitlines() if line.strip()]
    if not tokens:
        raise SystemExit(f"no tokens in {args.tokens}")
    result = runner(run(args, tokens))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
