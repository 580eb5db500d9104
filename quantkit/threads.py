"""Thread policy of the command line, applied before torch is imported (the OpenMP runtime reads
its settings once, when torch loads it).

PyTorch's OpenMP threads spin while they wait for work. On cores shared with other processes a
spinning thread that the kernel has descheduled stalls every parallel region: one GPTQ solve took
36 s with 2 threads on 2 busy cores against 2 s with OMP_WAIT_POLICY=PASSIVE (on idle cores the
policy changes nothing). So unless the user set them, ``quantkit`` runs with

- ``OMP_WAIT_POLICY=PASSIVE``: idle threads sleep instead of spinning;
- ``OMP_NUM_THREADS`` = the CPUs this process may use (its affinity mask, and the cgroup CPU quota
  when there is one), not every CPU of the machine.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process can run on: its affinity mask, capped by a cgroup v2 quota ("200000 100000" = 2)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def apply_thread_policy(environ: dict | None = None) -> None:
    """Set OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=available_cpus() where ``environ``
    (default os.environ) has neither; call before torch is imported."""
    environ = os.environ if environ is None else environ
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    environ.setdefault("OMP_NUM_THREADS", str(available_cpus()))
