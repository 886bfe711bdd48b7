"""The services one benchmark run uses, and the processes it starts.

Redis database 12 (flushed at start and end), a scratch PostgreSQL database (created, migrated,
dropped with FORCE at the end), moto's S3 server in a child process, and real `bigmodel worker`
processes. Every child gets its own session (a Ctrl-C reaches only the benchmark, which then
stops them in order) and a parent-death signal (SIGTERM if the benchmark itself is killed).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
DEFAULT_PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BUCKET = "bench"
FINAL_KEYS = ("succeeded", "failed", "cancelled", "expired")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:  # resolved here, not in the child: nothing should load between fork and exec
    import ctypes

    _PRCTL = ctypes.CDLL(None).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this child when the benchmark process dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _spawn(args: list[str], *, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            args,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM, wait, then SIGKILL: only this process, by its id."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _dead(pid: str) -> bool:
    return pid.isdigit() and not Path(f"/proc/{pid}").exists()


def proc_status_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A `/proc/<pid>/status` memory field in KiB (VmRSS: resident now; VmHWM: peak)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/{pid}/status")


@dataclass
class Worker:
    name: str
    model: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        """Raise if the worker has exited (with the end of its log)."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"worker {self.name} exited with code {self.proc.returncode}: "
                f"{_tail(self.log_path)}"
            )

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        return proc_status_kib(self.pid, "VmHWM")

    def log_text(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size


@dataclass
class Stack:
    """Redis, a scratch PostgreSQL database, moto's S3 server, workers; and their cleanup."""

    workdir: Path
    redis_url: str = DEFAULT_REDIS_URL
    pg_admin_url: str = DEFAULT_PG_ADMIN_URL
    device: str = "cpu"
    db_name: str = field(default_factory=lambda: f"bigmodel_bench_{os.getpid()}")
    settings: Any = None
    client: Any = None
    env: dict[str, str] = field(default_factory=dict)
    s3_endpoint: str | None = None
    workers: list[Worker] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    #: scratch databases of earlier runs whose process is gone (killed with SIGKILL)
    stale: list[str] = field(default_factory=list)
    _moto: subprocess.Popen | None = None
    _db_created: bool = False
    _redis_flushed: bool = False
    _counter: int = 0

    @property
    def database_url(self) -> str:
        return self.pg_admin_url.rsplit("/", 1)[0] + "/" + self.db_name

    # -- start --------------------------------------------------------------------------------

    def start(self) -> None:
        """Bring everything up; on failure, whatever did start is left for `close`."""
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        r = redis.Redis.from_url(self.redis_url, socket_connect_timeout=3)
        r.ping()
        r.flushdb()
        self._redis_flushed = True
        self.versions["redis"] = str(r.info("server").get("redis_version", "?"))
        r.close()

        import psycopg

        with psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=5) as admin:
            self.versions["postgresql"] = str(admin.execute("SHOW server_version").fetchone()[0])
            names = [
                r[0]
                for r in admin.execute(
                    "SELECT datname FROM pg_database WHERE datname LIKE 'bigmodel\\_bench\\_%'"
                )
            ]
            self.stale = [n for n in names if n != self.db_name and _dead(n.rsplit("_", 1)[1])]
            admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{self.db_name}"')
            self._db_created = True

        # The same credentials and endpoints here and in every worker; no stray BIGMODEL_*.
        for key in [k for k in os.environ if k.startswith("BIGMODEL_")]:
            del os.environ[key]
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        self._start_moto()

        import boto3

        boto3.client("s3", endpoint_url=self.s3_endpoint).create_bucket(Bucket=BUCKET)

        from bigmodel.core.settings import Settings
        from bigmodel.ledger.db import make_engine, upgrade

        home = self.workdir / "home"
        self.settings = Settings(
            home=home,
            broker_url=self.redis_url,
            database_url=self.database_url,
            storage_url=f"s3://{BUCKET}/bench",
            s3_endpoint_url=self.s3_endpoint,
        )
        engine = make_engine(self.settings.database)
        upgrade(engine)
        engine.dispose()
        self.env = dict(os.environ)
        self.env.update(
            {
                "BIGMODEL_HOME": str(home),
                "BIGMODEL_BROKER_URL": self.redis_url,
                "BIGMODEL_DATABASE_URL": self.database_url,
                "BIGMODEL_STORAGE_URL": self.settings.storage_url,
                "BIGMODEL_S3_ENDPOINT_URL": self.s3_endpoint,
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.client = self.new_client()

    def new_client(self):
        from producer.api import Client

        return Client(self.settings)

    def _start_moto(self) -> None:
        port = free_port()
        log = self.workdir / "logs" / "moto.log"
        self._moto = _spawn(
            [sys.executable, "-m", "bench.moto_server", str(port)],
            log_path=log,
            env=dict(os.environ),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if "ready" in log.read_text(errors="replace"):
                self.s3_endpoint = f"http://127.0.0.1:{port}"
                return
            if self._moto.poll() is not None:
                raise RuntimeError(f"moto's S3 server exited: {_tail(log)}")
            time.sleep(0.1)
        raise RuntimeError("moto's S3 server did not start in 60s")

    def live_pids(self) -> list[int]:
        """The children running now (moto's server and the workers)."""
        procs = [w.proc for w in self.workers] + ([self._moto] if self._moto else [])
        return [p.pid for p in procs if p.poll() is None]

    # -- workers ------------------------------------------------------------------------------

    def worker_command(self) -> list[str]:
        script = Path(sys.executable).with_name("bigmodel")
        if script.exists():
            return [str(script), "worker"]
        return [sys.executable, "-m", "workers"]

    def start_worker(
        self,
        model: str,
        *,
        max_batch_size: int,
        max_wait_ms: float | None = None,
        ready_timeout_s: float = 300.0,
    ) -> Worker:
        """Start `bigmodel worker` and return once its log says it is consuming."""
        self._counter += 1
        name = f"bench-{model}-{self._counter}"
        args = [
            *self.worker_command(),
            "--model",
            model,
            "--device",
            self.device,
            "--max-batch-size",
            str(max_batch_size),
            "--name",
            name,
            "--loglevel",
            "INFO",
        ]
        if max_wait_ms is not None:
            args += ["--max-wait-ms", str(max_wait_ms)]
        log = self.workdir / "logs" / f"{name}.log"
        worker = Worker(name, model, _spawn(args, log_path=log, env=self.env), log)
        self.workers.append(worker)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if "consuming bigmodel.model." in log.read_text(errors="replace"):
                return worker
            worker.check()
            time.sleep(0.1)
        raise RuntimeError(
            f"worker {name} not consuming after {ready_timeout_s:.0f}s: {_tail(log)}"
        )

    def stop_worker(self, worker: Worker) -> None:
        _stop(worker.proc)
        if worker in self.workers:
            self.workers.remove(worker)

    def stop_workers(self) -> None:
        for worker in list(self.workers):
            self.stop_worker(worker)

    # -- between sections ---------------------------------------------------------------------

    def reset(self) -> None:
        """No workers, empty model queues, an empty ledger (registered models are kept)."""
        import redis
        from sqlalchemy import text

        self.stop_workers()
        r = redis.Redis.from_url(self.redis_url)
        keys = list(r.scan_iter("bigmodel.model.*")) + [b"unacked", b"unacked_index"]
        r.delete(*keys)
        r.close()
        with self.client.engine.begin() as conn:
            conn.execute(text("TRUNCATE requests, batches RESTART IDENTITY CASCADE"))

    # -- stop ---------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every process started here and drop what was created; return any problems."""
        problems: list[str] = []
        for what, step in (
            ("workers", self.stop_workers),
            ("client", self._close_client),
            ("database", self._drop_db),
            ("redis", self._flush_redis),
            ("moto", self._stop_moto),
        ):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up
                problems.append(f"{what}: {type(exc).__name__}: {exc}")
        return problems

    def _close_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _drop_db(self) -> None:
        if not self._db_created:
            return
        import psycopg

        with psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        self._db_created = False

    def _flush_redis(self) -> None:
        if not self._redis_flushed:
            return
        import redis

        r = redis.Redis.from_url(self.redis_url, socket_connect_timeout=3)
        r.flushdb()
        r.close()

    def _stop_moto(self) -> None:
        if self._moto is not None:
            _stop(self._moto, timeout_s=10)
            self._moto = None


# -- waiting on the ledger ----------------------------------------------------------------------


def results_final(counts: dict[str, int]) -> bool:
    return counts["total"] > 0 and sum(counts[k] for k in FINAL_KEYS) == counts["total"]


def wait_results(
    client, batch_id: str, *, started: float, timeout_s: float, poll_s: float = 0.05, check=None
):
    """Poll `client.status` until every request of the batch is final in the database.

    The interval grows with the wait (at most 0.5% of it, up to 0.25 s) so that long runs are
    not measured against a database busy answering the poll. Returns (seconds since `started`
    on the perf_counter clock, the BatchInfo seen).
    """
    deadline = time.perf_counter() + timeout_s
    while True:
        info = client.status(batch_id)
        now = time.perf_counter()
        if results_final(info.counts):
            return now - started, info
        if now > deadline:
            raise TimeoutError(f"batch {batch_id} not done after {timeout_s:.0f}s: {info.counts}")
        if check is not None:
            check()
        time.sleep(max(poll_s, min(0.25, (now - started) / 200)))


def wait_batch_final(
    client, batch_id: str, *, started: float, timeout_s: float, poll_s: float = 0.05, check=None
):
    """Poll until the batch itself is final (output.jsonl and errors.jsonl written)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        info = client.status(batch_id)
        now = time.perf_counter()
        if info.is_final:
            return now - started, info
        if now > deadline:
            raise TimeoutError(f"batch {batch_id} still {info.status} after {timeout_s:.0f}s")
        if check is not None:
            check()
        time.sleep(poll_s)
