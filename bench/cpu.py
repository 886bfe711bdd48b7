"""How much of the machine's CPU went to processes that are not the benchmark's own.

The figures are only as good as the machine is quiet. For each section the benchmark compares
all busy CPU time (`/proc/stat`) with its own process tree's (itself, the workers it reaped and
the children still running), and reports the rest as other processes' share of all cores. The
database and broker servers (PostgreSQL, Redis) work for the benchmark, so their CPU time is
counted apart, not as other processes'.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> int | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10])  # already counted in user / nice
    return sum(fields) - idle - guest


def _pid_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(rest[11]) + int(rest[12])) / _TICK  # utime + stime


SERVICES = frozenset({"postgres", "redis-server"})


def _service_seconds() -> dict[int, float]:
    """CPU seconds so far of every PostgreSQL and Redis server process, by pid."""
    out: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm", encoding="utf-8") as f:
                if f.read().strip() not in SERVICES:
                    continue
        except OSError:
            continue
        out[int(entry.name)] = _pid_seconds(int(entry.name))
    return out


def _own_seconds(live_pids: Iterable[int]) -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        me.ru_utime
        + me.ru_stime
        + reaped.ru_utime
        + reaped.ru_stime
        + sum(_pid_seconds(p) for p in live_pids)
    )


@dataclass(frozen=True)
class Sample:
    wall: float
    busy_s: float | None
    own_s: float
    services: dict[int, float]


class CpuMeter:
    """`share(a, b)`: the fraction of all cores other processes kept busy between two samples."""

    def __init__(self, live_pids: Callable[[], Iterable[int]]) -> None:
        self.live_pids = live_pids
        self.cores = os.cpu_count() or 1

    def sample(self) -> Sample:
        busy = _busy_ticks()
        return Sample(
            time.perf_counter(),
            None if busy is None else busy / _TICK,
            _own_seconds(self.live_pids()),
            _service_seconds(),
        )

    def share(self, a: Sample, b: Sample) -> float | None:
        if a.busy_s is None or b.busy_s is None or b.wall - a.wall < 1.0:
            return None  # too short to say
        services = sum(t - a.services.get(pid, 0.0) for pid, t in b.services.items())
        others = (b.busy_s - a.busy_s) - (b.own_s - a.own_s) - services
        return max(0.0, min(1.0, others / ((b.wall - a.wall) * self.cores)))

    def idle_check(self, seconds: float = 1.0) -> float | None:
        """Other processes' share of the CPUs over `seconds`, measured now."""
        a = self.sample()
        time.sleep(seconds)
        return self.share(a, self.sample())
