"""`bigmodel worker`: load models once, then consume their queues in batches.

One process per GPU (`CUDA_VISIBLE_DEVICES=i bigmodel worker ...`). Nothing forks: models are
loaded in this process before it takes work, and CUDA is initialised only here.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

log = logging.getLogger("bigmodel.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bigmodel worker",
        description="Start a worker that loads each --model once, then consumes their queues, "
        "running requests in batches and writing results to the database and storage.",
    )
    p.add_argument(
        "--model",
        "-m",
        action="append",
        required=True,
        metavar="NAME",
        help="a registered model to serve (repeat for several)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when visible, else CPU), cpu or cuda:N (default: auto)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights and activations: auto = bfloat16 (or float16) on CUDA, float32 on CPU",
    )
    p.add_argument(
        "--channels-last",
        default="auto",
        choices=["auto", "on", "off"],
        help="NHWC memory format for convolutional models (auto: on for CUDA)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        metavar="N",
        help="most requests in one forward pass (default: the model's registered batch size)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=32768,
        metavar="T",
        help="generation: most padded tokens (rows x (prompt + new tokens)) in one "
        "generate call (default: 32768)",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=20.0,
        metavar="M",
        help="how long an idle model waits for more messages to fill a batch; while "
        "it is busy, a batch gathers until it frees up (default: 20)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="worker name recorded on the requests it runs (default: host:pid)",
    )
    p.add_argument(
        "--loglevel",
        default=os.environ.get("BIGMODEL_LOGLEVEL", "INFO"),
        help="logging level (default: INFO)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.max_batch_size is not None and args.max_batch_size < 1:
        print("error: --max-batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.max_batch_tokens < 1:
        print("error: --max-batch-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.max_wait_ms < 0:
        print("error: --max-wait-ms must be 0 or more", file=sys.stderr)
        return 2

    from bigmodel.core.errors import BigModelError

    try:
        consumer = build(args)
    except BigModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        log.info(
            "received %s: finishing the current batch, then stopping", signal.Signals(signum).name
        )
        consumer.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    consumer.run()
    s = consumer.runtime.stats
    log.info(
        "stopped after %d requests in %d batches (%d succeeded, %d failed, %d retried)",
        s.items,
        s.batches,
        s.succeeded,
        s.failed,
        s.retried,
    )
    return 0


def check_broker(app) -> None:
    """Warn when Redis may evict keys: an evicted message is work the reconciler must find."""
    if not str(app.conf.broker_url).startswith(("redis://", "rediss://")):
        return
    try:
        with app.connection_for_read() as conn:
            policy = conn.default_channel.client.config_get("maxmemory-policy")
    except Exception as exc:  # CONFIG is often disabled on managed Redis
        log.info("could not read Redis maxmemory-policy (%s); it should be noeviction", exc)
        return
    value = policy.get("maxmemory-policy")
    if value not in (None, "noeviction"):
        log.warning(
            "Redis maxmemory-policy is %s: set it to noeviction, or queued messages "
            "may be evicted under memory pressure",
            value,
        )


def build(args: argparse.Namespace):
    from transformers.utils import logging as hf_logging

    from bigmodel.broker import make_celery
    from bigmodel.core.runner import RunLoop
    from bigmodel.core.settings import get_settings
    from bigmodel.ledger.db import make_engine, require_schema
    from bigmodel.ledger.repo import Ledger
    from bigmodel.models import Accel, load_runner, pick_device
    from bigmodel.storage import open_storage
    from workers.consumer import BatchingConsumer
    from workers.runtime import Runtime

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    settings = get_settings()
    engine = make_engine(settings.database)
    require_schema(engine)
    ledger = Ledger(engine, tenant=settings.tenant)
    storage = open_storage(settings.storage, endpoint_url=settings.s3_endpoint_url)
    app = make_celery(settings)
    check_broker(app)
    device = pick_device(args.device)
    accel = Accel.for_device(device, dtype=args.dtype, channels_last=args.channels_last)
    models = list(dict.fromkeys(args.model))
    loops: dict[str, RunLoop] = {}
    sizes = []
    for name in models:
        info = ledger.get_model(name)
        size = args.max_batch_size or info.batch_size
        sizes.append(size)
        log.info(
            "loading model %s v%d (%s from %s) on %s, %s",
            info.name,
            info.version,
            info.task,
            info.source,
            device,
            accel,
        )
        loops[name] = RunLoop(
            load_runner(info, device=device, settings=settings, accel=accel),
            max_batch_size=size,
            max_batch_tokens=args.max_batch_tokens,
        )
    worker_name = args.name or f"{socket.gethostname()}:{os.getpid()}"
    runtime = Runtime(
        settings=settings,
        ledger=ledger,
        storage=storage,
        app=app,
        loops=loops,
        worker_name=worker_name,
    )
    log.info(
        "worker %s ready: models %s, max batch %d, max wait %.0f ms",
        worker_name,
        ", ".join(models),
        max(sizes),
        args.max_wait_ms,
    )
    return BatchingConsumer(
        app,
        runtime,
        models=models,
        max_batch_size=max(sizes),
        max_wait_s=args.max_wait_ms / 1000.0,
        stop=threading.Event(),
    )
