"""Shared bench plumbing: timed subprocesses with their own peak RSS, paths, result files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; QUANTKIT_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(os.environ.get("QUANTKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
RESULTS = ROOT / "bench" / "results"


def require_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        sys.exit(f"bench: {path} not found: the benchmarks read real text from ../shared/data beside the checkout")
    return path


def timed(cmd: list[str], env: dict | None = None) -> tuple[str, float, int]:
    """Run ``cmd``; return (stdout, wall seconds, peak RSS in bytes of that child process).

    The child's ru_maxrss starts from the caller's RSS at fork: call it from a process that has
    not imported torch, or the figures include the caller's memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return out.read(), seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def quantkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", *args]


def eval_ppl(model: str | Path, dataset: Path, seqlen: int, max_tokens: int, dtype: str = "float32") -> float:
    """Perplexity by `quantkit eval` (one evaluator for every checkpoint, computing in ``dtype``)."""
    out, _, _ = timed(quantkit("eval", str(model), "--dataset", str(dataset), "--seqlen", str(seqlen),
                               "--max-tokens", str(max_tokens), "--dtype", dtype, "--json"))
    return json.loads(out.strip().splitlines()[-1])["perplexity"]


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
