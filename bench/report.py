"""Result rows, the machine description, and their rendering as a rich table and as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

NOT_RUN = "not run"


@dataclass
class Row:
    """One figure: a value with its unit, a human rendering, details, or an error."""

    section: str
    figure: str
    value: float | None = None
    unit: str | None = None
    display: str | None = None
    details: str = ""
    error: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def pending(self) -> bool:
        return self.display is None and self.error is None

    def set(
        self, value: float | None, unit: str | None, display: str, details: str = "", **data: Any
    ) -> None:
        self.value, self.unit, self.display, self.details = value, unit, display, details
        self.data.update(data)

    def fail(self, exc: BaseException | str) -> None:
        self.error = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"


class Report:
    def __init__(self, console: Console, *, verbose: bool = False) -> None:
        self.console = console
        self.verbose = verbose
        self.rows: list[Row] = []
        self.machine: dict[str, Any] = {}
        self.options: dict[str, Any] = {}
        self.notes: list[str] = []
        self.started = time.perf_counter()
        #: per section: seconds, and other processes' share of all cores meanwhile
        self.sections: dict[str, dict[str, Any]] = {}

    def section(self, name: str, figures: list[str]) -> dict[str, Row]:
        """Declare a section's figures up front, so a failure can mark the ones not reached."""
        rows = {f: Row(name, f) for f in figures}
        self.rows.extend(rows.values())
        return rows

    def fail_pending(self, section: str, exc: BaseException | str) -> None:
        for row in self.rows:
            if row.section == section and row.pending:
                row.fail(exc)

    @contextmanager
    def guard(self, row: Row) -> Iterator[Row]:
        """Run one figure's measurement; an exception becomes that row's error, nothing more."""
        try:
            yield row
        except Exception as exc:  # noqa: BLE001 - the point is to keep going
            row.fail(exc)
            self.console.print(f"[red]  {row.section} / {row.figure}: {row.error}")
            if self.verbose:
                self.console.print(traceback.format_exc())

    def progress(self, text: str) -> None:
        self.console.print(f"[dim]{time.perf_counter() - self.started:6.1f}s  {text}")

    # -- output -------------------------------------------------------------------------------

    def print_machine(self) -> None:
        m = self.machine
        self.console.print(
            f"[bold]bigmodel benchmark[/]  {m.get('cpu_model', '?')} · {m.get('cores', '?')} "
            f"cores · {m.get('ram_gib', '?')} GiB RAM · torch {m.get('torch', '?')} "
            f"({m.get('torch_threads', '?')} threads) · device {m.get('device', '?')}"
        )
        self.console.print(
            f"[dim]python {m.get('python')} · transformers "
            f"{m.get('transformers')} · {m.get('platform')}"
        )

    def table(self, title: str) -> Table:
        table = Table(title=title, show_lines=False)
        table.add_column("section", style="bold")
        table.add_column("figure")
        table.add_column("value", justify="right")
        table.add_column("details", overflow="fold")
        last = None
        for row in self.rows:
            section = row.section if row.section != last else ""
            last = row.section
            if row.error is not None:
                table.add_row(section, row.figure, "[red]error[/]", f"[red]{row.error}[/]")
            elif row.pending:
                table.add_row(section, row.figure, f"[dim]{NOT_RUN}[/]", "")
            else:
                table.add_row(section, row.figure, row.display or "", row.details)
        return table

    def to_json(self, path: Path, **extra: Any) -> None:
        doc = {
            "machine": self.machine,
            "options": self.options,
            **extra,
            "sections": self.sections,
            "notes": self.notes,
            "rows": [asdict(r) for r in self.rows],
        }
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    for module in ("transformers", "moto"):
        try:
            info[module] = __import__(module).__version__
        except (ImportError, AttributeError):
            info[module] = None
    return info
