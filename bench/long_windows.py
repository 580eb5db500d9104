"""Peak RSS of the whole walk with the authors' long calibration windows (issue 19).

Quantizes SmolLM2-135M with --preset rsq-paper (rotation, attncon, clip search, W3 per-channel)
at --seqlen 4096 with 1, 2, … windows of C4, each run as its own process; prints one JSON line per
run (wall seconds, peak RSS of that process) and appends it to bench/results/long-windows-4096.jsonl.
The difference between runs is the memory each further window costs.

    OMP_NUM_THREADS=1 python bench/long_windows.py --nsamples 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import RESULTS, quantkit, require_data, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seqlen", type=int, default=4096)
    args = ap.parse_args()
    model = timed(quantkit("prepare-model", "smollm2-135m"))[0].strip().splitlines()[-1]
    calib = require_data("c4-sample.txt")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.nsamples:
            cmd = quantkit("quantize", model, str(Path(tmp) / "q"), "--preset", "rsq-paper", "--nsamples", str(n),
                           "--seqlen", str(args.seqlen), "--calibration", str(calib), "--force", "--quiet", "--json")
            _, seconds, rss = timed(cmd)
            run = {"nsamples": n, "seqlen": args.seqlen, "seconds": round(seconds, 1), "peak_rss_mib": round(rss / 2**20)}
            RESULTS.mkdir(parents=True, exist_ok=True)
            with (RESULTS / f"long-windows-{args.seqlen}.jsonl").open("a") as f:
                f.write(json.dumps(run) + "\n")
            print(json.dumps(run), flush=True)


if __name__ == "__main__":
    main()
