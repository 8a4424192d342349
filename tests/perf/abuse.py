"""Memory under abuse: a worker's resident memory while one client misbehaves, served as in production.

    poetry run python tests/perf/abuse.py [--attack token-variants] [--connections 100] ...

It starts an embedded PostgreSQL in a temporary folder (or uses the server at BENCH_DATABASE_URL), migrates a
fresh database, and for each attack starts gunicorn with one uvicorn worker on 127.0.0.1 (as tests/perf/bench.py
does), so every attack starts from a fresh worker. It prints the worker's resident memory (RSS) before the attack,
at its peak during it, and a few seconds after the attacker has gone, with what the server answered:

- token-variants: one valid token with a different run of characters that are not base64url appended to each
  request (up to 16 KB in all), as one signed-in user can send them;
- valid-tokens: distinct valid tokens of about 8 KB, more than a verified-token cache may hold;
- slow-bodies: --connections connections to /webhook, each declaring a 4 MiB body, sending all of it but 10 bytes,
  then waiting --hold seconds before leaving;
- slow-small-bodies: the same with 250,000-byte bodies (under a webhook limit of 256 KiB).

Every attack is bounded in requests and in time; the whole run takes about a minute and a half.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from jose import jwt

PERF_DIR = Path(__file__).resolve().parent
if str(PERF_DIR) not in sys.path:
    sys.path.insert(0, str(PERF_DIR))

from bench import (  # noqa: E402
    BenchError,
    Variant,
    database_server,
    fresh_database,
    gunicorn,
    log,
    prepare_database,
)

SECRET = "abuse-run-secret-" + "x" * 32
WEBHOOK_SECRET = "whsec_abuse_run"
SAMPLE_SECONDS = 0.1
MiB = 1024 * 1024


@dataclass
class Figures:
    attack: str
    before: float
    peak: float
    after: float
    answers: Counter[str]
    seconds: float


def worker_pid(master: int, timeout: float = 10.0) -> int:
    """The one worker gunicorn started (its master's only child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise BenchError("gunicorn started no worker")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for process {pid}")


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[list[float]]:
    """Sample the process's RSS until the block ends; the list holds the highest value seen."""
    peak = [rss_mib(pid)]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_SECONDS):
            with contextlib.suppress(OSError, BenchError):
                peak[0] = max(peak[0], rss_mib(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], rss_mib(pid))


# --- a minimal HTTP/1.1 client: raw requests, keep-alive, status and body read back ------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server closes the connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    closing = re.search(rb"(?i)\r\nconnection: *close", head) is not None
    return status, body, closing


async def send_all(port: int, requests: list[bytes], connections: int, deadline: float) -> Counter[str]:
    """Send the requests over `connections` keep-alive connections, until all are answered or the deadline."""
    answers: Counter[str] = Counter()
    queue = iter(requests)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in queue:
                if time.monotonic() > deadline:
                    return
                writer.write(request)
                status, body, closing = await read_response(reader)
                answers[f"{status} {body[:60].decode(errors='replace')}"] += 1
                if closing:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return answers


def get(port: int, path: str, token: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n\r\n".encode()


def token(user: uuid.UUID, **extra: object) -> str:
    now = int(time.time())
    claims = {"sub": str(user), "aud": "authenticated", "role": "authenticated", "iat": now, "exp": now + 3600}
    return jwt.encode({**claims, **extra}, SECRET, algorithm="HS256")


# --- the attacks -------------------------------------------------------------------------------------------------


async def token_variants(port: int, args: argparse.Namespace) -> Counter[str]:
    """One valid token, a new spelling per request: 15,000 characters outside base64url appended, one fewer each."""
    valid = token(uuid.uuid4())
    longest = 16_000 - len(valid)
    requests = [get(port, "/public-data", valid + "!" * (longest - index)) for index in range(args.requests)]
    return await send_all(port, requests, 32, time.monotonic() + args.time_limit)


async def valid_tokens(port: int, args: argparse.Namespace) -> Counter[str]:
    """Distinct valid tokens of about 8 KB (a large user_metadata), as many as the cache could hold."""
    user = uuid.uuid4()
    padding = "x" * 5_800  # base64url makes it 4/3 as long: about 8,100 characters in all
    requests = [
        get(port, "/public-data", token(user, jti=str(index), user_metadata={"bio": padding}))
        for index in range(args.requests)
    ]
    return await send_all(port, requests, 32, time.monotonic() + args.time_limit)


def slow_bodies(size: int) -> Callable[[int, argparse.Namespace], Awaitable[Counter[str]]]:
    async def attack(port: int, args: argparse.Namespace) -> Counter[str]:
        """Connections each declaring `size` bytes to /webhook, sending all but 10, then waiting."""
        body = memoryview(b"x" * size)
        answers: Counter[str] = Counter()

        async def one() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Listening from the start: a server that refuses early answers before the body is sent.
            answer = asyncio.ensure_future(read_response(reader))
            try:
                writer.write(
                    f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                    f"Stripe-Signature: t=1,v1=00\r\nContent-Length: {size}\r\n\r\n".encode()
                )
                sent = 0
                with contextlib.suppress(ConnectionError):
                    while sent < size - 10 and not answer.done():  # in pieces, as a slow network delivers them
                        piece = body[sent : min(sent + 65536, size - 10)]
                        writer.write(piece)
                        await writer.drain()
                        sent += len(piece)
                try:  # hold the connection open, the body unfinished, and see whether the server answers
                    status, text, _ = await asyncio.wait_for(answer, args.hold)
                    answers[f"{status} {text[:60].decode(errors='replace')}"] += 1
                except TimeoutError:
                    answers[f"still waiting after {args.hold:g}s"] += 1
                except (ConnectionError, asyncio.IncompleteReadError):
                    answers["connection closed without an answer"] += 1
            finally:
                answer.cancel()
                writer.close()

        await asyncio.gather(*(one() for _ in range(args.connections)))
        return answers

    return attack


ATTACKS: dict[str, Callable[[int, argparse.Namespace], Awaitable[Counter[str]]]] = {
    "token-variants": token_variants,
    "valid-tokens": valid_tokens,
    "slow-bodies": slow_bodies(4 * MiB),
    "slow-small-bodies": slow_bodies(250_000),
}


def run_attack(name: str, args: argparse.Namespace, database_url: object, work: Path) -> Figures:
    variant = Variant(name, name, "main:app", {"STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET})
    with gunicorn(variant, 1, database_url, SECRET, work) as (port, master):  # type: ignore[arg-type]
        pid = worker_pid(master)
        warm = [get(port, "/public-data", token(uuid.uuid4())) for _ in range(200)]
        asyncio.run(send_all(port, warm, 4, time.monotonic() + 30))
        time.sleep(1)
        before = rss_mib(pid)
        log(f"{name}: worker {pid} at {before:.0f} MiB; attacking")
        started = time.monotonic()
        with peak_rss(pid) as peak:
            answers = asyncio.run(ATTACKS[name](port, args))
        seconds = time.monotonic() - started
        time.sleep(args.settle)
        after = rss_mib(pid)
        return Figures(name, before, peak[0], after, answers, seconds)


def report(rows: list[Figures]) -> str:
    lines = [
        "| attack | RSS before | peak during | after | seconds | answers |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        answers = "; ".join(f"{count} x {answer}" for answer, count in row.answers.most_common(3))
        lines.append(
            f"| {row.attack} | {row.before:.0f} MiB | {row.peak:.0f} MiB | {row.after:.0f} MiB | "
            f"{row.seconds:.1f} | {answers} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attack", choices=sorted(ATTACKS), action="append", help="default: all, in turn")
    parser.add_argument("--requests", type=int, default=12_000, help="requests of the token attacks")
    parser.add_argument("--time-limit", type=float, default=30.0, help="seconds a token attack may last at most")
    parser.add_argument("--connections", type=int, default=100, help="connections of the slow-body attacks")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds a slow body waits for an answer")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds between the attack's end and 'after'")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[Figures] = []
    try:
        with tempfile.TemporaryDirectory(prefix="picads-abuse-") as folder:
            work = Path(folder)
            with database_server(work) as (server_url, _), fresh_database(server_url) as (url, _):
                asyncio.run(prepare_database(url, 0))
                for name in args.attack or list(ATTACKS):
                    rows.append(run_attack(name, args, url, work))
    except BenchError as exc:
        print(f"abuse: {exc}", file=sys.stderr)
        return 2
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
