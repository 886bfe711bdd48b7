"""`python -m bench`: argument parsing, the run, the table, the JSON file, and the cleanup."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console

import bench
from bench.config import DEFAULT, QUICK, SECTIONS
from bench.cpu import CpuMeter
from bench.report import Report, Row, machine_info
from bench.sections import SECTIONS as RUNNERS
from bench.sections import Ctx
from bench.stack import DEFAULT_PG_ADMIN_URL, DEFAULT_REDIS_URL, Stack

#: Other processes' share of the CPUs above which figures are flagged as noisy.
NOISY = 0.10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="small workloads (about 2 minutes on 2 cores)"
    )
    p.add_argument(
        "--only", metavar="LIST", help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}"
    )
    p.add_argument(
        "--json-out",
        metavar="FILE",
        type=Path,
        help="also write the results (and machine, options) as JSON",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:N], in-process and for the workers (default: cpu)",
    )
    p.add_argument(
        "--image-ref",
        choices=["s3", "data"],
        default="s3",
        help="how the classify images are referenced in both runs (default: s3)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="keep models and logs here (models are reused when present); "
        "default: a temporary folder removed at the end",
    )
    p.add_argument(
        "--redis-url",
        default=DEFAULT_REDIS_URL,
        help=f"Redis database to use; it is FLUSHED (default: {DEFAULT_REDIS_URL})",
    )
    p.add_argument(
        "--pg-url",
        default=DEFAULT_PG_ADMIN_URL,
        help="PostgreSQL server (any database on it) where a scratch database "
        f"is created and dropped (default: {DEFAULT_PG_ADMIN_URL})",
    )
    sizes = p.add_argument_group("sizes (override the profile)")
    sizes.add_argument("--classify-n", type=int, metavar="N")
    sizes.add_argument("--generate-n", type=int, metavar="N")
    sizes.add_argument("--null-n", type=int, metavar="N")
    sizes.add_argument("--submit-n", type=int, metavar="N")
    sizes.add_argument("--batching-n", type=int, metavar="N")
    sizes.add_argument("--latency-samples", type=int, metavar="N")
    sizes.add_argument(
        "--memory-n",
        type=int,
        metavar="N",
        dest="memory_last",
        help="items processed at the second memory reading",
    )
    p.add_argument(
        "--latency-without-priority",
        action="store_true",
        help="latency section: send probes and bulk work at normal priority (a "
        "baseline; also runs when Client.submit has no priority parameter)",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="print tracebacks of failures")
    return p


def _config(args: argparse.Namespace):
    cfg = QUICK if args.quick else DEFAULT
    overrides = {
        k: getattr(args, k)
        for k in (
            "classify_n",
            "generate_n",
            "null_n",
            "submit_n",
            "batching_n",
            "latency_samples",
            "memory_last",
        )
        if getattr(args, k) is not None
    }
    for key, value in overrides.items():
        if value < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be at least 1")
    return replace(
        cfg,
        device=args.device,
        image_ref=args.image_ref,
        latency_without_priority=args.latency_without_priority,
        **overrides,
    )


def _selected(only: str | None) -> list[str]:
    if not only:
        return list(SECTIONS)
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(
            f"--only: unknown section(s) {', '.join(unknown)}; use {', '.join(SECTIONS)}"
        )
    return [s for s in SECTIONS if s in wanted]


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING)
    for name in ("botocore", "boto3", "urllib3", "werkzeug", "celery", "kombu", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _on_sigterm(signum, _frame):
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = _config(args)
    selected = _selected(args.only)
    if cfg.memory_last <= cfg.memory_first:
        raise SystemExit(f"--memory-n must be over {cfg.memory_first}")
    _quiet_libraries()
    # Piped output gets a table wide enough to read rather than rich's 80-column default.
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    console = Console() if wide else Console(width=160)
    report = Report(console, verbose=args.verbose)
    report.options = {
        "profile": "quick" if args.quick else "default",
        "sections": selected,
        **asdict(cfg),
    }
    report.machine = machine_info(cfg.device)
    report.print_machine()
    quiet = CpuMeter(lambda: []).idle_check(1.0)
    report.machine["others_cpu_before"] = quiet
    if quiet is not None and quiet > NOISY:
        console.print(
            f"[yellow]warning: other processes are using {quiet:.0%} of the CPUs "
            "right now; the figures will be noisy"
        )
        report.notes.append(f"other processes used {quiet:.0%} of the CPUs at the start")

    temporary = args.workdir is None
    workdir = (
        Path(tempfile.mkdtemp(prefix="bigmodel-bench-")) if temporary else args.workdir.resolve()
    )
    stack = Stack(workdir, redis_url=args.redis_url, pg_admin_url=args.pg_url, device=cfg.device)
    meter = CpuMeter(stack.live_pids)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.perf_counter()
    interrupted = False
    cleanup: list[str] = []
    try:
        report.progress(
            f"starting services: Redis {args.redis_url}, PostgreSQL database "
            f"{stack.db_name}, moto S3 server; work folder {workdir}"
        )
        try:
            stack.start()
        except Exception as exc:  # noqa: BLE001 - nothing can run; say why
            report.rows.append(Row("setup", "services", error=f"{type(exc).__name__}: {exc}"))
            raise _SetupFailed from exc
        report.machine.update(stack.versions)
        if stack.stale:
            report.notes.append(
                f"scratch databases left by killed runs: "
                f"{', '.join(stack.stale)} (DROP DATABASE ... WITH (FORCE))"
            )
        console.print(
            f"[dim]PostgreSQL {stack.versions.get('postgresql')} · Redis "
            f"{stack.versions.get('redis')} · S3: moto "
            f"{report.machine.get('moto')} at {stack.s3_endpoint}"
        )
        ctx = Ctx(cfg=cfg, stack=stack, report=report, models_dir=workdir / "models")
        for name in selected:
            first_row = len(report.rows)
            before = meter.sample()
            try:
                RUNNERS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one section's failure is its rows' error
                _fail_from(report, first_row, name, exc)
            finally:
                _reset_quietly(stack, report)
            after = meter.sample()
            others = meter.share(before, after)
            report.sections[name] = {"seconds": after.wall - before.wall, "others_cpu": others}
            report.progress(
                f"{name}: {after.wall - before.wall:.0f}s"
                + ("" if others is None else f"; other processes used {others:.0%} of the CPUs")
            )
    except _SetupFailed:
        pass
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: stopping workers and dropping the scratch database")
        for row in report.rows:
            if row.pending:
                row.fail("interrupted")
    finally:
        ignored = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            cleanup = stack.close()
            if temporary:
                shutil.rmtree(workdir, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, ignored[signal.SIGINT])
            signal.signal(signal.SIGTERM, previous)
    elapsed = time.perf_counter() - started
    profile = "quick" if args.quick else "default"
    console.print(report.table(f"bigmodel benchmark ({profile}, {elapsed:.0f}s)"))
    noisy = {
        k: v["others_cpu"]
        for k, v in report.sections.items()
        if v["others_cpu"] is not None and v["others_cpu"] > NOISY
    }
    if noisy:
        report.notes.append(
            "other processes kept the CPUs busy during "
            + ", ".join(f"{k} ({v:.0%})" for k, v in noisy.items())
            + "; those figures understate this machine"
        )
    for note in report.notes:
        console.print(f"[yellow]warning: {note}")
    for problem in cleanup:
        console.print(f"[red]cleanup: {problem}")
    if args.json_out:
        report.to_json(
            args.json_out, elapsed_s=elapsed, interrupted=interrupted, cleanup_problems=cleanup
        )
        console.print(f"[dim]results written to {args.json_out}")
    if interrupted:
        return 130
    return 1 if any(r.error for r in report.rows) or cleanup else 0


class _SetupFailed(Exception):
    pass


def _fail_from(report: Report, first_row: int, section: str, exc: BaseException) -> None:
    message = f"{type(exc).__name__}: {exc}"
    rows = [r for r in report.rows[first_row:] if r.pending]
    if len(report.rows) == first_row:
        rows = [Row(section, "(setup)")]
        report.rows.extend(rows)
    for row in rows:
        row.fail(message)
    report.console.print(f"[red]  {section}: {message}")
    if report.verbose:
        import traceback

        report.console.print(traceback.format_exc())


def _reset_quietly(stack: Stack, report: Report) -> None:
    try:
        stack.reset()
    except Exception as exc:  # noqa: BLE001 - the next section will say if it matters
        report.console.print(f"[yellow]  could not reset between sections: {exc}")
