"""The measurements. Each section declares its rows, fills them, and leaves no worker running."""

from __future__ import annotations

import gc
import inspect
import math
import re
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import workloads
from bench.config import Config
from bench.report import Report, Row
from bench.stack import Stack, Worker, wait_batch_final, wait_results

FLUSH_LINE = re.compile(r"processed (\d+) requests from (\d+) messages")


@dataclass
class Ctx:
    cfg: Config
    stack: Stack
    report: Report
    models_dir: Path
    _noop: Any = None
    _classifier: Any = None

    @property
    def client(self):
        return self.stack.client

    def classifier(self):
        """resnet18 (1,000 classes, random weights), registered once per run."""
        if self._classifier is None:
            folder = workloads.build_classifier(self.models_dir / "resnet18-1000")
            self._classifier = self.client.register_model(
                "bench-resnet18",
                str(folder),
                task="classify",
                arch=workloads.CLASSIFY_ARCH,
                batch_size=self.cfg.classify_batch,
            )
        return self._classifier

    def noop(self):
        """The `null:` model (no work: the pipeline's own cost), registered once per run."""
        if self._noop is None:
            self._noop = self.client.register_model(
                workloads.NULL_MODEL, "null:", task="generate", batch_size=workloads.NULL_BATCH
            )
        return self._noop


@dataclass
class BatchRun:
    batch_id: str
    submit_s: float
    results_s: float
    final_s: float
    counts: dict[str, int] = field(default_factory=dict)


def start_worker(
    ctx: Ctx, model: str, *, max_batch_size: int, max_wait_ms: float | None = None
) -> Worker:
    started = time.perf_counter()
    worker = ctx.stack.start_worker(model, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    ctx.report.progress(
        f"worker {worker.name} (pid {worker.pid}) consuming after "
        f"{time.perf_counter() - started:.1f}s"
    )
    return worker


def rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"


def run_batch(
    ctx: Ctx,
    requests: list[dict] | Path,
    *,
    worker: Worker | None,
    poll_s: float = 0.05,
    **submit_kw: Any,
) -> BatchRun:
    """Submit, then time until every result is final and until the batch itself is final."""
    client = ctx.client
    check = worker.check if worker is not None else None
    started = time.perf_counter()
    batch = client.submit(requests, **submit_kw)
    submit_s = time.perf_counter() - started
    results_s, _ = wait_results(
        client, batch.id, started=started, timeout_s=ctx.cfg.timeout_s, poll_s=poll_s, check=check
    )
    final_s, info = wait_batch_final(
        client, batch.id, started=started, timeout_s=ctx.cfg.timeout_s, poll_s=poll_s, check=check
    )
    return BatchRun(batch.id, submit_s, results_s, final_s, dict(info.counts))


def flush_sizes(worker: Worker, offset: int = 0) -> list[int]:
    """Requests per flush from the worker's "processed N requests from M messages" lines."""
    return [int(m.group(1)) for m in FLUSH_LINE.finditer(worker.log_text(offset))]


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: with 20 samples, p95 is the 19th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# -- 1-3: in-process limit vs end to end --------------------------------------------------------


@dataclass(frozen=True)
class WorkerDefaults:
    """What `bigmodel worker` passes to `load_runner` and `RunLoop` when given no options
    besides the batch size, so the in-process loop runs the model exactly as a worker does."""

    load: dict[str, Any]
    loop: dict[str, Any]

    def note(self) -> str:
        parts = [f"{k.replace('_', ' ')} {v:,}" for k, v in self.loop.items()]
        accel = self.load.get("accel")
        if accel is not None:
            parts += [
                f"{getattr(accel, 'dtype', '?')}",
                "channels-last" if getattr(accel, "channels_last", False) else "",
            ]
        return "".join(f", {p}" for p in parts if p)


def worker_defaults(device: str) -> WorkerDefaults:
    from bigmodel.core.runner import RunLoop
    from bigmodel.models import load_runner
    from workers.main import build_parser

    args = build_parser().parse_args(["--model", "x", "--device", device])
    load: dict[str, Any] = {}
    if "accel" in inspect.signature(load_runner).parameters:
        from bigmodel.models import Accel

        load["accel"] = Accel.for_device(device, dtype=args.dtype, channels_last=args.channels_last)
    accepted = inspect.signature(RunLoop).parameters
    loop = {
        name: getattr(args, name)
        for name in ("max_batch_tokens",)
        if name in accepted and getattr(args, name, None) is not None
    }
    return WorkerDefaults(load, loop)


@dataclass
class InProcess:
    seconds: float
    outputs: dict[str, dict | None]
    failed: int


def in_process(ctx: Ctx, info, requests: list[dict], batch_size: int) -> InProcess:
    """The worker's own runner and run loop, called directly: decode, preprocess, forward."""
    from bigmodel.core.runner import Item, RunLoop
    from bigmodel.models import load_runner

    items = [Item(i, r["input"], r.get("params", {})) for i, r in enumerate(requests)]
    defaults = worker_defaults(ctx.cfg.device)
    runner = load_runner(info, device=ctx.cfg.device, settings=ctx.stack.settings, **defaults.load)
    loop = RunLoop(runner, max_batch_size=batch_size, **defaults.loop)
    try:
        loop.run(items[:batch_size])  # warm-up: first passes, decode threads, S3 connections
        started = time.perf_counter()
        results = loop.run(items)
        seconds = time.perf_counter() - started
    finally:
        loop.close()
        del runner, loop
        gc.collect()
    outputs = {requests[i]["custom_id"]: r.output for i, r in enumerate(results)}
    return InProcess(seconds, outputs, sum(not r.ok for r in results))


def end_to_end(
    ctx: Ctx, model: str, requests: list[dict], batch_size: int
) -> tuple[BatchRun, dict[str, dict]]:
    """One real worker; a warm-up batch first; then submit → every result final."""
    stack = ctx.stack
    stack.reset()
    warmup = [{**r, "custom_id": "warm-" + r["custom_id"]} for r in requests[:batch_size]]
    worker = start_worker(ctx, model, max_batch_size=batch_size)
    try:
        run_batch(ctx, warmup, worker=worker)
        run = run_batch(ctx, requests, worker=worker)
        records = {rec["custom_id"]: rec for rec in ctx.client.results(run.batch_id)}
    finally:
        stack.stop_worker(worker)
    return run, records


def _compare(
    ctx: Ctx,
    rows: dict[str, Row],
    *,
    info,
    requests: list[dict],
    batch_size: int,
    what: str,
    describe: str,
    agree: Callable[[dict | None, dict | None], bool],
    agree_label: str,
    tokens: Callable[[dict | None], int] | None = None,
) -> None:
    report, n = ctx.report, len(requests)
    inproc: InProcess | None = None
    with report.guard(rows["in-process"]) as row:
        report.progress(f"{info.name}: in-process, {n} {what}, batch {batch_size}")
        inproc = in_process(ctx, info, requests, batch_size)
        r = n / inproc.seconds
        extra = ""
        if tokens is not None:
            produced = sum(tokens(o) for o in inproc.outputs.values())
            extra = f"; {rate(produced / inproc.seconds)} new tokens/s"
        row.set(
            r,
            "items/s",
            f"{rate(r)} items/s",
            f"{n} {what} in {inproc.seconds:.1f}s, RunLoop max batch {batch_size}"
            f"{worker_defaults(ctx.cfg.device).note()}, "
            f"{describe}{extra}; {inproc.failed} failed",
            seconds=inproc.seconds,
            items=n,
            failed=inproc.failed,
        )
    e2e: BatchRun | None = None
    with report.guard(rows["end-to-end"]) as row:
        report.progress(f"{info.name}: end to end through one worker")
        e2e, records = end_to_end(ctx, info.name, requests, batch_size)
        r = n / e2e.results_s
        same = ""
        if inproc is not None:
            agreeing = sum(
                agree(inproc.outputs.get(cid), (rec or {}).get("output"))
                for cid, rec in records.items()
            )
            same = f"; {agree_label} as in-process {agreeing}/{n}"
        extra = ""
        if tokens is not None:
            produced = sum(tokens((rec or {}).get("output")) for rec in records.values())
            extra = f"; {rate(produced / e2e.results_s)} new tokens/s"
        failed = e2e.counts.get("failed", 0)
        row.set(
            r,
            "items/s",
            f"{rate(r)} items/s",
            f"submit→results final {e2e.results_s:.1f}s (submit {e2e.submit_s:.2f}s, "
            f"batch completed {e2e.final_s:.1f}s); worker --max-batch-size {batch_size}"
            f"{extra}; {failed} failed{same}",
            seconds=e2e.results_s,
            submit_s=e2e.submit_s,
            final_s=e2e.final_s,
            items=n,
            failed=failed,
        )
    with report.guard(rows["e2e / in-process"]) as row:
        if inproc is None or e2e is None:
            row.set(None, None, "n/a", "needs both runs above")
        else:
            a, b = n / e2e.results_s, n / inproc.seconds
            row.set(a / b, "ratio", f"{a / b:.2f}", f"{rate(a)} / {rate(b)} items/s")


def section_classify(ctx: Ctx) -> None:
    cfg, client = ctx.cfg, ctx.client
    rows = ctx.report.section("classify", ["in-process", "end-to-end", "e2e / in-process"])
    ctx.report.progress(
        f"classify: resnet18 (1,000 classes, random weights), "
        f"{cfg.classify_n} JPEGs at 224 px as {cfg.image_ref} references"
    )
    info = ctx.classifier()
    refs = workloads.image_refs(client.storage, cfg.classify_n, mode=cfg.image_ref)
    requests = workloads.classify_requests(info.name, refs)

    def top1(a: dict | None, b: dict | None) -> bool:
        return bool(a and b) and a["labels"][0]["index"] == b["labels"][0]["index"]

    _compare(
        ctx,
        rows,
        info=info,
        requests=requests,
        batch_size=cfg.classify_batch,
        what="images",
        agree=top1,
        agree_label="same top-1 class",
        describe=f"images as {'s3:// objects' if cfg.image_ref == 's3' else 'data: URIs'}",
    )


def section_generate(ctx: Ctx) -> None:
    cfg, client = ctx.cfg, ctx.client
    rows = ctx.report.section("generate", ["in-process", "end-to-end", "e2e / in-process"])
    ctx.report.progress(
        f"generate: GPT-2 small shape (12 layers, 768 dims, random weights), "
        f"{cfg.generate_n} prompts, {cfg.new_tokens} new tokens, greedy"
    )
    folder = workloads.build_gpt2_small(ctx.models_dir / "gpt2-small")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = workloads.make_prompts(cfg.generate_n)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    info = client.register_model(
        "bench-gpt2-small", str(folder), task="generate", batch_size=cfg.generate_batch
    )
    requests = workloads.generate_requests(info.name, prompts, new_tokens=cfg.new_tokens)

    def same_text(a: dict | None, b: dict | None) -> bool:
        return bool(a and b) and a["sequences"][0]["text"] == b["sequences"][0]["text"]

    def new_tokens(out: dict | None) -> int:
        return sum(s["tokens"] for s in out["sequences"]) if out else 0

    _compare(
        ctx,
        rows,
        info=info,
        requests=requests,
        batch_size=cfg.generate_batch,
        what="prompts",
        agree=same_text,
        agree_label="same text",
        tokens=new_tokens,
        describe=f"prompts {min(lengths)}–{max(lengths)} tokens "
        f"(mean {statistics.mean(lengths):.0f}), {cfg.new_tokens} new, greedy",
    )


# -- 4: orchestration ceiling -------------------------------------------------------------------


def section_null(ctx: Ctx) -> None:
    cfg, stack = ctx.cfg, ctx.stack
    rows = ctx.report.section("null model", ["end-to-end ceiling"])
    with ctx.report.guard(rows["end-to-end ceiling"]) as row:
        ctx.noop()
        stack.reset()
        ctx.report.progress(
            f"null model: {cfg.null_n:,} requests through one worker "
            f"(--max-batch-size {cfg.null_batch})"
        )
        worker = start_worker(ctx, workloads.NULL_MODEL, max_batch_size=cfg.null_batch)
        try:
            run_batch(
                ctx, workloads.null_requests(2 * cfg.null_batch, prefix="warm"), worker=worker
            )
            offset = worker.log_size()
            run = run_batch(ctx, workloads.null_requests(cfg.null_n, prefix="req"), worker=worker)
            flushes = flush_sizes(worker, offset)
        finally:
            stack.stop_worker(worker)
        r = cfg.null_n / run.results_s
        mean_flush = f"{statistics.mean(flushes):.0f}" if flushes else "?"
        row.set(
            r,
            "items/s",
            f"{rate(r)} items/s",
            f"{cfg.null_n:,} requests (null: model, no compute) in {run.results_s:.1f}s, "
            f"submit {run.submit_s:.1f}s of it; batch completed {run.final_s:.1f}s; "
            f"{len(flushes)} flushes of {mean_flush} on average; "
            f"{run.counts.get('failed', 0)} failed",
            seconds=run.results_s,
            submit_s=run.submit_s,
            final_s=run.final_s,
            items=cfg.null_n,
            flushes=len(flushes),
        )


# -- 5: submit rate -----------------------------------------------------------------------------


def section_submit(ctx: Ctx) -> None:
    import redis

    from bigmodel.broker import queue_name

    cfg, stack, client = ctx.cfg, ctx.stack, ctx.client
    rows = ctx.report.section("submit", ["JSONL → ledger + queue"])
    with ctx.report.guard(rows["JSONL → ledger + queue"]) as row:
        ctx.noop()
        stack.reset()
        path = workloads.write_jsonl(
            stack.workdir / "submit.jsonl", workloads.null_requests(cfg.submit_n, prefix="sub")
        )
        ctx.report.progress(f"submit: {cfg.submit_n:,} lines from a JSONL file, no worker")
        client.submit(workloads.null_requests(10, prefix="warm"))  # connections, first queries
        r = redis.Redis.from_url(stack.redis_url)
        before = r.llen(queue_name(workloads.NULL_MODEL))
        started = time.perf_counter()
        client.submit(path)
        seconds = time.perf_counter() - started
        messages = r.llen(queue_name(workloads.NULL_MODEL)) - before
        r.close()
        stack.reset()
        size_mb = path.stat().st_size / 1e6
        value = cfg.submit_n / seconds
        row.set(
            value,
            "requests/s",
            f"{rate(value)} requests/s",
            f"{cfg.submit_n:,} lines ({size_mb:.1f} MB) in {seconds:.2f}s: validate, "
            f"store input.jsonl, insert rows, send {messages} chunk messages",
            seconds=seconds,
            lines=cfg.submit_n,
            messages=messages,
        )


# -- 6: formed batch size -----------------------------------------------------------------------


def section_batching(ctx: Ctx) -> None:
    """1,000 one-request submissions at once, twice: to a resnet18 worker, whose model time lets
    requests gather while it is busy, and to a null-model worker, where only the wait window can
    gather them (so its batches are bounded by arrivals x --max-wait-ms)."""
    cfg, client = ctx.cfg, ctx.client
    rows = ctx.report.section(
        "batching", ["average formed batch (resnet18)", "average formed batch (null model)"]
    )
    n = cfg.batching_n
    with ctx.report.guard(rows["average formed batch (resnet18)"]) as row:
        info = ctx.classifier()
        refs = workloads.image_refs(client.storage, min(n, cfg.classify_n), mode=cfg.image_ref)

        def image(i: int) -> dict:
            return {
                "custom_id": f"one-{i:05d}",
                "model": info.name,
                "input": {"image": refs[i % len(refs)]},
                "params": {"top_k": 5},
            }

        _formed_batches(
            ctx, row, info.name, image, warm=[image(i) for i in range(8)], what="images (resnet18)"
        )
    with ctx.report.guard(rows["average formed batch (null model)"]) as row:
        ctx.noop()

        def ping(i: int) -> dict:
            return {
                "custom_id": f"one-{i:05d}",
                "model": workloads.NULL_MODEL,
                "input": {"prompt": "ping"},
            }

        _formed_batches(
            ctx,
            row,
            workloads.NULL_MODEL,
            ping,
            warm=workloads.null_requests(1, prefix="warm"),
            what="pings (null model)",
        )


def _formed_batches(
    ctx: Ctx, row: Row, model: str, request: Callable[[int], dict], *, warm: list[dict], what: str
) -> None:
    from sqlalchemy import func, select

    from bigmodel.core.status import REQUEST_FINAL
    from bigmodel.ledger.models import RequestRow

    cfg, stack = ctx.cfg, ctx.stack
    stack.reset()
    n, threads = cfg.batching_n, cfg.batching_threads
    ctx.report.progress(
        f"batching: {n:,} one-request submissions of {what} from {threads} "
        f"threads, worker --max-batch-size {cfg.batching_max_batch} "
        f"--max-wait-ms {cfg.batching_wait_ms:.0f}"
    )
    worker = start_worker(
        ctx, model, max_batch_size=cfg.batching_max_batch, max_wait_ms=cfg.batching_wait_ms
    )
    try:
        run_batch(ctx, warm, worker=worker)
        offset = worker.log_size()
        started, window, last_submit = _submit_singles(ctx, request, n, threads)
        ctx.report.progress(f"submitted {n:,} in {window:.1f}s; waiting for the results")
        final = [str(s) for s in REQUEST_FINAL]
        ours = RequestRow.custom_id.like("one-%")
        deadline = time.monotonic() + cfg.timeout_s
        while True:
            with ctx.client.engine.connect() as conn:
                done = conn.scalar(select(func.count()).where(ours, RequestRow.status.in_(final)))
            if done >= n:
                finished = time.perf_counter()
                break
            worker.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done}/{n} single requests final after {cfg.timeout_s:.0f}s")
            time.sleep(0.1)
        flushes = flush_sizes(worker, offset)
    finally:
        stack.stop_worker(worker)
    # One claim (UPDATE ... RETURNING) stamps all the requests it takes with one started_at:
    # requests sharing (worker, started_at) went through the model together.
    with ctx.client.engine.connect() as conn:
        groups = conn.execute(
            select(RequestRow.worker, RequestRow.started_at, func.count())
            .where(ours)
            .group_by(RequestRow.worker, RequestRow.started_at)
        ).all()
        failed = conn.scalar(select(func.count()).where(ours, RequestRow.status != "succeeded"))
    sizes = sorted(g[2] for g in groups)
    avg = n / len(sizes)
    log_avg = (
        f"{statistics.mean(flushes):.1f} over {len(flushes)} flushes"
        if flushes
        else "no flush lines"
    )
    throughput = n / (finished - started)
    row.set(
        avg,
        "requests/batch",
        f"{avg:.1f} requests/batch ({avg / cfg.batching_max_batch:.2f} x max)",
        f"{len(sizes)} batches (grouped by claim: worker + started_at), sizes "
        f"{sizes[0]}–{sizes[-1]}, median {statistics.median(sizes):g}; arrivals "
        f"{n / window:.0f}/s over {window:.1f}s; first submit → all final "
        f"{finished - started:.1f}s ({rate(throughput)} items/s, all final "
        f"{finished - last_submit:.1f}s after the last submit); {failed} not succeeded; "
        f"worker log: {log_avg}",
        batches=len(sizes),
        sizes=sizes,
        arrival_per_s=n / window,
        items_per_s=throughput,
        failed=failed,
        log_flush_sizes=flushes,
    )


def _submit_singles(
    ctx: Ctx, request: Callable[[int], dict], n: int, threads: int
) -> tuple[float, float, float]:
    """Submit `n` one-line batches from `threads` threads released together.

    Returns the perf_counter time of the release, the submission window in seconds and the
    perf_counter time of the last submit.
    """
    stop = threading.Event()
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []
    stamps: list[float] = []
    lock = threading.Lock()

    def submitter(k: int) -> None:
        client = ctx.stack.new_client()
        try:
            barrier.wait()
            for i in range(k, n, threads):
                if stop.is_set():
                    return
                client.submit([request(i)])
                with lock:
                    stamps.append(time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            stop.set()
        finally:
            client.close()

    pool = [
        threading.Thread(target=submitter, args=(k,), daemon=True, name=f"submit-{k}")
        for k in range(threads)
    ]
    for t in pool:
        t.start()
    try:
        barrier.wait(timeout=120)
        started = time.perf_counter()
        for t in pool:
            while t.is_alive():
                t.join(timeout=0.5)
    except BaseException:
        stop.set()
        raise
    if errors:
        raise errors[0]
    return started, max(stamps) - started, max(stamps)


# -- 7: latency of one high-priority request ---------------------------------------------------


def priority_supported() -> bool:
    from producer.api import Client

    return "priority" in inspect.signature(Client.submit).parameters


@dataclass(frozen=True)
class Probe:
    seconds: float  # submit call → result final
    submit_s: float  # the submit call alone
    batch_id: str


def _probe(ctx: Ctx, i: int, model: str, submit_kw: dict[str, Any], worker: Worker) -> Probe:
    """One single-request batch, timed until its result is final (polled every 5 ms)."""
    req = [{"custom_id": f"probe-{i:04d}", "model": model, "input": {"prompt": "ping"}}]
    started = time.perf_counter()
    batch = ctx.client.submit(req, **submit_kw)
    submit_s = time.perf_counter() - started
    seconds, _ = wait_results(
        ctx.client,
        batch.id,
        started=started,
        timeout_s=ctx.cfg.timeout_s,
        poll_s=0.005,
        check=worker.check,
    )
    return Probe(seconds, submit_s, batch.id)


def section_latency(ctx: Ctx) -> None:
    """Twice: on the null model (the queue's and worker loop's own latency) and on a null model
    taking `latency_batch_ms` per batch (a model with a batch time, the target's terms)."""
    cfg = ctx.cfg
    supported = priority_supported()
    use_priority = supported and not cfg.latency_without_priority
    suffix = "" if use_priority else " (no priority)"
    timed = f"{cfg.latency_batch_ms} ms batches"
    figures = {
        "null": (f"idle worker{suffix}", f"busy worker{suffix}"),
        "timed": (f"idle worker, {timed}{suffix}", f"busy worker, {timed}{suffix}"),
    }
    rows = ctx.report.section("latency p50 / p95", [f for pair in figures.values() for f in pair])
    if not supported and not cfg.latency_without_priority:
        for row in rows.values():
            row.set(
                None,
                None,
                "n/a (priority not available)",
                "Client.submit has no `priority` parameter",
            )
        return
    high = {"priority": "high"} if use_priority else {}
    low = {"priority": "low"} if use_priority else {}
    ctx.noop()
    _latency_pair(ctx, workloads.NULL_MODEL, workloads.NULL_BATCH, rows, figures["null"], high, low)
    slow = f"noop-{cfg.latency_batch_ms}ms"
    ctx.client.register_model(
        slow,
        f"null:delay_ms={cfg.latency_batch_ms}",
        task="generate",
        batch_size=cfg.latency_timed_batch,
    )
    idle, busy = _latency_pair(
        ctx, slow, cfg.latency_timed_batch, rows, figures["timed"], high, low
    )
    row = rows[figures["timed"][1]]
    if idle and busy and row.error is None:
        added = percentile(busy, 95) - percentile(idle, 50)
        from workers.main import build_parser

        wait_ms = build_parser().parse_args(["--model", slow]).max_wait_ms  # the worker default
        bound = 2 * cfg.latency_batch_ms + wait_ms
        row.details += (
            f"; p95 − idle p50 = {added:.0f} ms against 2 × {cfg.latency_batch_ms}"
            f" ms + max-wait {wait_ms:.0f} ms = {bound:.0f} ms"
        )
        row.data.update(added_p95_ms=added, bound_ms=bound)


def _latency_pair(
    ctx: Ctx,
    model: str,
    batch: int,
    rows: dict[str, Row],
    figures: tuple[str, str],
    high: dict,
    low: dict,
) -> tuple[list[float], list[float]]:
    """Idle then busy probes on one worker of `model`; returns both sets of samples (ms)."""
    cfg = ctx.cfg
    ctx.stack.reset()
    ctx.report.progress(
        f"latency: {cfg.latency_samples} single requests"
        f"{' at priority high' if high else ''} to a worker of {model}, idle then busy"
    )
    idle: list[float] = []
    busy: list[float] = []
    worker = start_worker(ctx, model, max_batch_size=batch)
    try:
        _probe(ctx, 0, model, high, worker)  # warm-up
        with ctx.report.guard(rows[figures[0]]) as row:
            probes = []
            for i in range(cfg.latency_samples):
                probe = _probe(ctx, i + 1, model, high, worker)
                probes.append(probe)
                # Let the worker finish the batch (output files) so the next probe finds it idle.
                wait_batch_final(
                    ctx.client,
                    probe.batch_id,
                    started=time.perf_counter(),
                    timeout_s=cfg.timeout_s,
                    poll_s=0.01,
                    check=worker.check,
                )
                time.sleep(0.05)
            idle = _latency_row(row, probes, "idle worker (nothing queued)", high)
        with ctx.report.guard(rows[figures[1]]) as row:
            probes, backlogs = _busy_probes(ctx, model, worker, high, low)
            bulk = "low-priority bulk work" if low else "bulk work of the same priority"
            busy = _latency_row(
                row,
                probes,
                f"worker busy with {bulk} (backlog "
                f"{min(backlogs):,}–{max(backlogs):,} queued at submit)",
                high,
                backlogs=backlogs,
            )
    finally:
        ctx.stack.stop_worker(worker)
    return idle, busy


def _busy_probes(
    ctx: Ctx, model: str, worker: Worker, high: dict, low: dict
) -> tuple[list[Probe], list[int]]:
    """Probe while bulk work is queued; top the backlog up before each probe."""
    from sqlalchemy import func, select

    from bigmodel.ledger.models import RequestRow

    cfg, client = ctx.cfg, ctx.client
    bulk: list[str] = []

    def backlog() -> int:
        if not bulk:
            return 0
        with client.engine.connect() as conn:
            return conn.scalar(
                select(func.count()).where(
                    RequestRow.batch_id.in_(bulk), RequestRow.status == "queued"
                )
            )

    probes: list[Probe] = []
    backlogs: list[int] = []
    deadline = time.perf_counter() + cfg.latency_busy_budget_s
    try:
        while len(probes) < cfg.latency_samples and time.perf_counter() < deadline:
            if backlog() < cfg.latency_bulk // 2:
                reqs = workloads.null_requests(
                    cfg.latency_bulk, prefix=f"bulk{len(bulk)}", model=model
                )
                bulk.append(client.submit(reqs, **low).id)
                time.sleep(0.2)  # let the worker get going on it
            queued = backlog()
            probe = _probe(ctx, 1000 + len(probes), model, high, worker)
            if queued > 0:
                probes.append(probe)
                backlogs.append(queued)
    finally:
        for batch_id in bulk:
            client.cancel(batch_id)
    if not probes:
        raise RuntimeError(f"no probe found bulk work queued in {cfg.latency_busy_budget_s:.0f}s")
    return probes, backlogs


def _latency_row(row: Row, probes: list[Probe], what: str, high: dict, **data: Any) -> list[float]:
    total = [p.seconds * 1000 for p in probes]
    submit = [p.submit_s * 1000 for p in probes]
    p50, p95 = percentile(total, 50), percentile(total, 95)
    prio = "priority high" if high else "normal priority"
    row.set(
        p50,
        "ms (p50)",
        f"{p50:.0f} / {p95:.0f} ms",
        f"{len(probes)} single requests, {prio}, {what}; submit call → result final, max "
        f"{max(total):.0f} ms; the submit call alone p50 {percentile(submit, 50):.0f} ms",
        p50_ms=p50,
        p95_ms=p95,
        samples_ms=total,
        submit_ms=submit,
        **data,
    )
    return total


# -- 8: worker memory ---------------------------------------------------------------------------


def section_memory(ctx: Ctx) -> None:
    cfg, stack = ctx.cfg, ctx.stack
    first, last = cfg.memory_first, cfg.memory_last
    figs = [f"RSS after {first:,} items", f"RSS after {last:,} items", "growth"]
    rows = ctx.report.section("worker memory", figs)
    ctx.noop()
    stack.reset()
    ctx.report.progress(
        f"memory: VmRSS of a null-model worker after {first:,} and {last:,} requests"
    )
    worker = start_worker(ctx, workloads.NULL_MODEL, max_batch_size=workloads.NULL_BATCH)
    try:
        ready = worker.rss_kib()
        run_batch(ctx, workloads.null_requests(first, prefix="m0"), worker=worker)
        time.sleep(0.5)
        rss1 = worker.rss_kib()
        rows[figs[0]].set(
            rss1 / 1024,
            "MiB",
            f"{rss1 / 1024:.0f} MiB",
            f"VmRSS; {ready / 1024:.0f} MiB when it started consuming",
            rss_kib=rss1,
            ready_kib=ready,
        )
        done = first
        while done < last:
            k = min(25_000, last - done)
            run_batch(ctx, workloads.null_requests(k, prefix=f"m{done}"), worker=worker)
            done += k
        time.sleep(0.5)
        rss2, hwm = worker.rss_kib(), worker.hwm_kib()
        rows[figs[1]].set(
            rss2 / 1024,
            "MiB",
            f"{rss2 / 1024:.0f} MiB",
            f"VmRSS; peak (VmHWM) {hwm / 1024:.0f} MiB",
            rss_kib=rss2,
            hwm_kib=hwm,
        )
        growth = (rss2 - rss1) / rss1 * 100
        rows["growth"].set(
            growth,
            "%",
            f"{growth:+.1f} %",
            f"{(rss2 - rss1) / 1024:+.1f} MiB over {last - first:,} more requests",
        )
    finally:
        stack.stop_worker(worker)


SECTIONS: dict[str, Callable[[Ctx], None]] = {
    "classify": section_classify,
    "generate": section_generate,
    "null": section_null,
    "submit": section_submit,
    "batching": section_batching,
    "latency": section_latency,
    "memory": section_memory,
}
