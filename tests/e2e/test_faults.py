"""Faults on real processes: killed workers, several workers, Redis and PostgreSQL losing their
state or connections, storage outages, SIGTERM. After each, every request ends exactly once."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from tests.conftest import free_port, service_missing

FAST_RECOVERY = {
    "BIGMODEL_LEASE_S": "3",
    "BIGMODEL_RECONCILE_INTERVAL_S": "1",
    "BIGMODEL_LOST_GRACE_S": "2",
}


def write_job(stack, n: int, *, tokens: int = 40, name: str = "job.jsonl", model="gen"):
    path = stack.home / name
    path.write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"r{i:05d}",
                    "model": model,
                    "input": {"prompt": f"Hello {i}"},
                    "params": {"max_new_tokens": tokens},
                }
            )
            + "\n"
            for i in range(n)
        )
    )
    return path


def wait_until(predicate, timeout_s: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_exactly_once(stack, batch_id: str, total: int, *, max_attempts: int = 1):
    final = stack.wait_final(batch_id, timeout_s=240)
    assert final["status"] == "completed", final
    assert final["counts"]["succeeded"] == total, final
    audit = json.loads(stack.cli("audit", batch_id, "--json").stdout)
    assert audit["ok"] and audit["lost"] == audit["doubled"] == audit["mismatched"] == 0, audit
    assert audit["submitted"] == total
    (worst,) = stack.sql("SELECT max(attempts) FROM requests WHERE batch_id = :b", b=batch_id)
    assert worst[0] <= max_attempts, worst
    return final


def counts(stack, batch_id) -> dict[str, int]:
    """Requests of the batch per status, straight from the ledger (polls must be quick)."""
    found = dict(
        stack.sql(
            "SELECT status, count(*) FROM requests WHERE batch_id = :b GROUP BY status", b=batch_id
        )
    )
    return {s: found.get(s, 0) for s in ("queued", "running", "succeeded", "failed")}


def register_slow(stack, delay_ms: int, name: str = "slow") -> str:
    """A no-op model taking `delay_ms` per batch: work stays in flight long enough to be hit."""
    stack.cli("models", "register", name, f"null:delay_ms={delay_ms}", "--task", "generate")
    return name


def test_kill_9_mid_batch_every_request_completes_once(stack):
    stack.env.update(FAST_RECOVERY)
    model = register_slow(stack, 300)
    path = write_job(stack, 80, model=model)
    w1 = stack.start_worker(model, extra=("--max-batch-size", "4"), name="w1")
    batch = stack.cli("submit", str(path)).stdout.strip()
    wait_until(
        lambda: counts(stack, batch)["succeeded"] >= 4 and counts(stack, batch)["running"],
        what="work in flight",
    )
    w1.kill()
    w1.wait()
    stuck = stack.sql(
        "SELECT count(*) FROM requests WHERE batch_id = :b AND status = 'running'", b=batch
    )[0][0]
    assert stuck > 0  # killed while holding requests
    stack.start_worker(model, extra=("--max-batch-size", "4"), name="w2")
    assert_exactly_once(stack, batch, 80, max_attempts=2)
    redone = stack.sql(
        "SELECT count(*) FROM requests WHERE batch_id = :b AND attempts = 2", b=batch
    )[0][0]
    assert redone == stuck


def test_three_workers_share_a_queue_without_doing_anything_twice(stack):
    path = write_job(stack, 300, tokens=6)
    for name in ("w1", "w2", "w3"):
        stack.start_worker("gen", extra=("--max-batch-size", "4"), name=name)
    batch = stack.cli("submit", str(path)).stdout.strip()
    assert_exactly_once(stack, batch, 300, max_attempts=1)
    used = stack.sql(
        "SELECT worker, count(*) FROM requests WHERE batch_id = :b GROUP BY worker", b=batch
    )
    assert len(used) >= 2, used


@pytest.fixture
def private_redis():
    """A Redis server of this test's own, to restart at will (nothing kept on disk)."""
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("redis-server", FileNotFoundError("not on PATH"))
    port = free_port()

    def start():
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: _connects(port), 10, "redis to start")
        return proc

    state = {"proc": start()}

    def restart():
        state["proc"].kill()
        state["proc"].wait()
        state["proc"] = start()

    yield f"redis://127.0.0.1:{port}/0", restart
    state["proc"].kill()
    state["proc"].wait()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_redis_restart_mid_run_loses_no_request(stack, private_redis):
    url, restart = private_redis
    stack.env.update(FAST_RECOVERY, BIGMODEL_BROKER_URL=url)
    model = register_slow(stack, 200)
    path = write_job(stack, 120, model=model)
    stack.start_worker(model, extra=("--max-batch-size", "4"))
    batch = stack.cli("submit", str(path)).stdout.strip()
    wait_until(lambda: counts(stack, batch)["succeeded"] >= 8, what="progress")
    restart()  # every queued message is gone
    assert counts(stack, batch)["queued"] > 0  # so the reconciler has work to bring back
    assert_exactly_once(stack, batch, 120, max_attempts=2)


def test_sigterm_finishes_the_batch_in_hand_and_leaves_the_rest_queued(stack):
    model = register_slow(stack, 400)
    path = write_job(stack, 60, model=model)
    w1 = stack.start_worker(model, extra=("--max-batch-size", "4"), name="w1")
    batch = stack.cli("submit", str(path)).stdout.strip()
    wait_until(lambda: counts(stack, batch)["running"], what="work in flight")
    w1.send_signal(signal.SIGTERM)
    assert w1.wait(timeout=60) == 0
    c = counts(stack, batch)
    assert c["running"] == 0 and c["succeeded"] >= 1 and c["queued"] >= 1, c
    assert (
        stack.sql("SELECT count(*) FROM requests WHERE worker = 'w1' AND status != 'succeeded'")[0][
            0
        ]
        == 0
    )
    log = (stack.home / "worker-w1.log").read_text()
    assert "received SIGTERM: finishing the current batch" in log
    stack.start_worker(model, extra=("--max-batch-size", "4"), name="w2")
    assert_exactly_once(stack, batch, 60, max_attempts=1)  # nothing was run twice


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_database_connections_dropped_under_a_running_worker(stack):
    """Three times, once the worker has made progress since the last drop, every connection it
    holds is terminated mid-run; it recovers each time and nothing is lost or run twice."""
    import psycopg

    stack.env.update(FAST_RECOVERY)
    model = register_slow(stack, 150)
    path = write_job(stack, 300, model=model)
    stack.start_worker(model, extra=("--max-batch-size", "4"))
    batch = stack.cli("submit", str(path)).stdout.strip()
    dbname = stack.env["BIGMODEL_DATABASE_URL"].rsplit("/", 1)[1]
    done = 0
    for _ in range(3):

        def progressed(seen=done):
            now = counts(stack, batch)
            return now["running"] and now["succeeded"] > seen and now["succeeded"]

        done = wait_until(progressed, what="progress since the last drop")
        time.sleep(random.uniform(0, 0.3))
        with psycopg.connect(stack.env["BIGMODEL_DATABASE_URL"], autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchone()[0]
        assert killed >= 1
    assert_exactly_once(stack, batch, 300, max_attempts=2)


class Proxy:
    """A TCP proxy to the S3 server that a test can take down and bring back."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.up = threading.Event()
        self.conns: list[socket.socket] = []
        self.start()

    def start(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port), reuse_port=True)
        self.up.set()
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def stop(self) -> None:
        self.up.clear()
        self.server.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns = []

    def _accept(self, server) -> None:
        while self.up.is_set():
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass


def test_storage_outage_is_retried_until_it_succeeds(stack):
    import boto3

    from bigmodel.models.tiny import make_images

    moto_port = int(stack.env["BIGMODEL_S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = Proxy(moto_port)
    s3 = boto3.client("s3", endpoint_url=stack.env["BIGMODEL_S3_ENDPOINT_URL"])
    reqs = []
    for i, img in enumerate(make_images(24, size=64, seed=3)):
        s3.put_object(Bucket=stack.bucket, Key=f"in/{i}.jpg", Body=img)
        reqs.append(
            {
                "custom_id": f"img{i}",
                "model": "cls",
                "input": {"image": f"s3://{stack.bucket}/in/{i}.jpg"},
            }
        )
    path = stack.home / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    batch = stack.cli("submit", str(path)).stdout.strip()  # the input file goes to S3 directly

    stack.env.update(FAST_RECOVERY, BIGMODEL_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")
    proxy.stop()  # S3 is down when the worker starts fetching
    stack.start_worker("cls")
    wait_until(
        lambda: "transient fault" in (stack.home / "worker-w1.log").read_text(),
        what="a retried fetch",
    )
    time.sleep(2)
    proxy.start()
    final = assert_exactly_once(stack, batch, 24, max_attempts=5)
    assert final["counts"]["failed"] == 0


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_soak_chaos_20000_requests_two_workers(stack, tiny_models):
    """Two workers on a no-op model while a chaos loop kills -9 and restarts them at random.

    The model sleeps 25 ms per batch of 20 (about 25 s of model time in all), so the run lasts
    long enough for the chaos loop, whose every restart waits until the new worker consumes.
    """
    stack.env.update(FAST_RECOVERY)
    stack.cli(
        "models", "register", "noop", "null:delay_ms=25", "--task", "generate", "--batch-size", "20"
    )
    total = 20_000
    path = write_job(stack, total, tokens=1, name="soak.jsonl", model="noop")
    procs = {
        name: stack.start_worker("noop", extra=("--max-batch-size", "20"), name=name)
        for name in ("s1", "s2")
    }
    batch = stack.cli("submit", str(path)).stdout.strip()
    rng = random.Random(0)
    kills = 0
    deadline = time.monotonic() + 240

    def running() -> bool:
        (status,) = stack.sql("SELECT status FROM batches WHERE id = :b", b=batch)[0]
        return status != "completed" and time.monotonic() < deadline

    while running():
        time.sleep(rng.uniform(0.2, 1.5))
        name = rng.choice(sorted(procs))
        procs[name].kill()
        procs[name].wait()
        kills += 1
        procs[name] = stack.start_worker("noop", extra=("--max-batch-size", "20"), name=name)
    assert kills >= 3
    final = assert_exactly_once(stack, batch, total, max_attempts=5)
    audit = json.loads(stack.cli("audit", batch, "--json").stdout)
    (stack.home / "soak-audit.json").write_text(
        json.dumps({"kills": kills, "final": final, "audit": audit}, indent=2)
    )
    print(f"soak: {total} requests, {kills} kills, audit {audit}")


def test_a_request_that_keeps_killing_its_worker_ends_as_poison(stack):
    """Whenever request r00003 is running, its worker dies (kill -9): after the attempt limit
    it fails with `poison`, and its batch-mates, first claimed with it, still succeed.

    The model sleeps 1.5 s per batch, so a request stays `running` long enough to be seen."""
    stack.env.update(FAST_RECOVERY, BIGMODEL_MAX_ATTEMPTS="3")
    model = register_slow(stack, 1500)
    path = write_job(stack, 6, tokens=1, model=model)
    batch = stack.cli("submit", str(path)).stdout.strip()
    name = "w1"
    worker = stack.start_worker(model, extra=("--max-batch-size", "8"), name=name)
    kills = 0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status, holder = stack.sql(
            "SELECT status, worker FROM requests WHERE custom_id = 'r00003' AND batch_id = :b",
            b=batch,
        )[0]
        if status == "failed":
            break
        if status == "running" and holder == name:  # the current worker runs it: it dies
            worker.kill()
            worker.wait()
            kills += 1
            name = f"w{kills + 1}"
            worker = stack.start_worker(model, extra=("--max-batch-size", "8"), name=name)
        time.sleep(0.05)
    final = stack.wait_final(batch)
    assert kills == 3, kills
    rows = {
        r.custom_id: r
        for r in stack.sql(
            "SELECT custom_id, status, attempts, error_code FROM requests WHERE batch_id = :b",
            b=batch,
        )
    }
    assert (rows["r00003"].status, rows["r00003"].error_code) == ("failed", "poison")
    assert rows["r00003"].attempts == 3
    others = [r for c, r in rows.items() if c != "r00003"]
    assert all(r.status == "succeeded" and r.attempts <= 2 for r in others), others
    assert final["counts"]["succeeded"] == 5 and final["counts"]["failed"] == 1
