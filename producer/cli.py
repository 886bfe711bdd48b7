"""The `bigmodel` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bigmodel",
        description="Message-queue driven batch inference. Settings come from BIGMODEL_* "
        "environment variables (BROKER_URL, DATABASE_URL, STORAGE_URL, S3_ENDPOINT_URL); with "
        "none set everything runs embedded under ./.bigmodel.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="submit a JSONL file of requests; prints the batch id")
    s.add_argument("file", help='JSONL, one {"custom_id","model","input","params"} per line')
    s.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    s.add_argument(
        "--priority",
        choices=["high", "normal", "low"],
        default="normal",
        help="high is served before queued normal and low work (default: normal)",
    )
    s.add_argument(
        "--completion-window",
        metavar="WINDOW",
        help="expire what is unfinished after this long, e.g. 24h, 30m, 7d",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("status", help="a batch's status and request counts")
    s.add_argument("batch")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("results", help="one record per request: custom_id, status, output, error")
    s.add_argument("batch")
    s.add_argument("--output", "-o", help="write to this file instead of standard output")
    s.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")

    s = sub.add_parser("cancel", help="cancel a batch: queued requests at once, running finish")
    s.add_argument("batch")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("audit", help="lost / doubled / mismatched requests of a batch")
    s.add_argument("batch")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser(
        "reconcile",
        help="re-enqueue lost and abandoned requests, expire and "
        "finish batches (workers also do this periodically)",
    )
    s.add_argument(
        "--lost-grace-s",
        type=float,
        default=None,
        help="how long a queued request may be missing from the broker, and a batch whose "
        "requests are all final may wait for its files (default: BIGMODEL_LOST_GRACE_S)",
    )
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("batches", help="the most recent batches")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("models", help="the model registry")
    msub = s.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    r = msub.add_parser("register", help="register NAME (a new version if it exists)")
    r.add_argument("name")
    r.add_argument(
        "source",
        help="a local folder, an s3:// prefix, a hub id, "
        "torchvision:<arch> for published weights, or null: / null:delay_ms=N "
        "(a model doing no work, for benchmarks)",
    )
    r.add_argument("--task", required=True, choices=["classify", "generate"])
    r.add_argument("--arch", help="torchvision architecture of a classify folder (resnet50, ...)")
    r.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="requests per batch and per message (default: 32 classify, 16 generate)",
    )
    r.add_argument("--json", action="store_true")
    ls = msub.add_parser("list", help="the latest version of every model")
    ls.add_argument("--json", action="store_true")

    s = sub.add_parser("db", help="database schema")
    dsub = s.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dsub.add_parser("upgrade", help="apply the migrations (Alembic) up to the latest")
    dsub.add_parser("current", help="print the schema revision of the database")

    sub.add_parser("worker", help="start a worker (see `bigmodel worker --help`)", add_help=False)

    s = sub.add_parser("demo", help="run the main job end to end on tiny local models")
    s.add_argument("--images", type=int, default=36, help="classify requests (default 36)")
    s.add_argument("--prompts", type=int, default=36, help="generate requests (default 36)")
    s.add_argument("--device", default="auto", help="worker device (default auto)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        # The worker lives in its own package; the producer side never imports it.
        os.execv(sys.executable, [sys.executable, "-m", "workers", *argv[1:]])
    args = build_parser().parse_args(argv)
    from sqlalchemy.exc import OperationalError

    from bigmodel.core.errors import BigModelError, NotFound, SubmissionRejected

    try:
        return COMMANDS[args.command](args)
    except SubmissionRejected as exc:
        if getattr(args, "json", False):
            print(
                json.dumps(
                    {"error": "submission_rejected", "lines": [e.as_dict() for e in exc.errors]},
                    ensure_ascii=False,
                )
            )
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BigModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OperationalError as exc:
        print(
            f"error: the database is unreachable ({str(exc.orig).strip()}); nothing was changed",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _client():
    from producer.api import Client

    return Client()


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=None))


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client()
    info = client.submit(
        args.file, priority=args.priority, completion_window=args.completion_window
    )
    if args.wait:
        info = wait_with_progress(client, info.id, quiet=args.json)
    if args.json:
        _print_json(info.as_dict())
    else:
        print(info.id)
    return EXIT_OK


def wait_with_progress(client, batch_id: str, *, quiet: bool = False, check=None):
    """Wait for the batch with a progress bar on stderr; `check()` may raise to stop waiting."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, disable=quiet, transient=False) as bar:
        task = bar.add_task(batch_id, total=None, detail="")

        def show(info) -> None:
            if check is not None:
                check()
            c = info.counts
            done = c["succeeded"] + c["failed"] + c["cancelled"] + c["expired"]
            bar.update(
                task,
                total=c["total"],
                completed=done,
                detail=f"{info.status} · {c['succeeded']} ok · {c['failed']} failed",
            )

        return client.wait(batch_id, progress=show)


def cmd_status(args: argparse.Namespace) -> int:
    info = _client().status(args.batch)
    if args.json:
        _print_json(info.as_dict())
    else:
        c = info.counts
        print(f"{info.id}  {info.status}  " + "  ".join(f"{k}={c[k]}" for k in c))
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    from bigmodel.core.results import csv_header, csv_row, jsonl_line

    client = _client()
    records = client.results(args.batch)
    out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        if args.format == "csv":
            out.write(csv_header())
            for rec in records:
                out.write(csv_row(rec))
        else:
            for rec in records:
                out.write(jsonl_line(rec))
    finally:
        if args.output:
            out.close()
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    info = _client().cancel(args.batch)
    if args.json:
        _print_json(info.as_dict())
    else:
        print(
            f"{info.id}  {info.status}  cancelled={info.counts['cancelled']} "
            f"running={info.counts['running']}"
        )
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    report = _client().audit(args.batch)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(
            f"{report.batch_id}  {report.status}  submitted={report.submitted} "
            f"in_ledger={report.in_ledger} final={report.final} lost={report.lost} "
            f"doubled={report.doubled} mismatched={report.mismatched}"
        )
        for kind, ids in report.examples.items():
            print(f"  {kind}: {', '.join(ids)}")
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_reconcile(args: argparse.Namespace) -> int:
    report = _client().reconcile(lost_grace_s=args.lost_grace_s)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(
            f"expired batches: {len(report.expired)}  requeued (lease expired): "
            f"{report.lease_requeued}  poisoned: {report.poisoned}  requeued (lost): "
            f"{report.lost_requeued}  finalized: {len(report.finalized)}"
        )
    return EXIT_OK


def cmd_batches(args: argparse.Namespace) -> int:
    infos = _client().batches(limit=args.limit)
    if args.json:
        _print_json([i.as_dict() for i in infos])
    else:
        for i in infos:
            print(
                f"{i.id}  {i.status:<11}  {i.counts['total']:>7} requests  "
                f"{i.created_at:%Y-%m-%d %H:%M:%S}"
            )
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    client = _client()
    if args.models_command == "register":
        info = client.register_model(
            args.name, args.source, task=args.task, arch=args.arch, batch_size=args.batch_size
        )
        if args.json:
            _print_json(info.as_dict())
        else:
            print(f"registered {info.name} v{info.version} ({info.task}, {info.source})")
        return EXIT_OK
    models = client.models()
    if args.json:
        _print_json([m.as_dict() for m in models])
    else:
        for m in models:
            arch = f" arch={m.arch}" if m.arch else ""
            print(f"{m.name}  v{m.version}  {m.task}  batch={m.batch_size}{arch}  {m.source}")
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    from bigmodel.core.settings import get_settings
    from bigmodel.ledger.db import current_revision, head_revision, make_engine, upgrade

    engine = make_engine(get_settings().database)
    if args.db_command == "upgrade":
        upgrade(engine)
    rev = current_revision(engine)
    print(
        f"{engine.url.render_as_string(hide_password=True)}: revision {rev} "
        f"(latest {head_revision()})"
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from producer.demo import run_demo

    return run_demo(images=args.images, prompts=args.prompts, device=args.device)


COMMANDS = {
    "submit": cmd_submit,
    "status": cmd_status,
    "results": cmd_results,
    "cancel": cmd_cancel,
    "batches": cmd_batches,
    "audit": cmd_audit,
    "reconcile": cmd_reconcile,
    "models": cmd_models,
    "db": cmd_db,
    "demo": cmd_demo,
}
