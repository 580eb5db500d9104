"""Core benchmark on SmolLM2-135M: FP, RTN and GPTQ at W4/W3/W2 g64 asymmetric.

Calibrate on ../shared/data/c4-sample.txt (128 × 512 tokens), evaluate on the first 32k tokens
of ../shared/data/wikitext2-test.txt (seqlen 512). Each quantization runs as its own process:
wall seconds and peak RSS are that process's. Prints a table and writes bench/results/core.json.

    python bench/core.py [--nsamples 128] [--eval-tokens 32768] [--bits 4 3 2] [--methods rtn gptq]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import eval_ppl, quantkit, require_data, save, timed


def prepare_model() -> str:
    out, _, _ = timed(quantkit("prepare-model", "smollm2-135m"))
    return out.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more quantize flags for every run")
    args = ap.parse_args()
    calib, test = require_data("c4-sample.txt"), require_data("wikitext2-test.txt")
    model = prepare_model()
    rows = [{"method": "fp", "bits": 16, "ppl": eval_ppl(model, test, args.seqlen, args.eval_tokens)}]
    print(f"fp  ppl {rows[0]['ppl']:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            for method in args.methods:
                out = Path(tmp) / f"{method}-w{bits}"
                cmd = quantkit("quantize", model, str(out), "--method", method, "--bits", str(bits),
                               "--group-size", str(args.group_size), "--asym", "--calibration", str(calib),
                               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--json", "--quiet",
                               *args.extra)
                _, seconds, rss = timed(cmd)
                row = {"method": method, "bits": bits, "group_size": args.group_size, "seconds": round(seconds, 1),
                       "peak_rss_mib": round(rss / 2**20), "ppl": eval_ppl(out, test, args.seqlen, args.eval_tokens)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    fp = rows[0]["ppl"]
    print(f"\nSmolLM2-135M, calib C4 {args.nsamples}×{args.seqlen}, WikiText-2 test (no blank lines) "
          f"first {args.eval_tokens} tokens, seqlen {args.seqlen}")
    print(f"| recipe | ppl | Δ vs FP | quantize s | peak RSS MiB |\n|---|---|---|---|---|\n| FP32 | {fp:.3f} | – | – | – |")
    for r in rows[1:]:
        print(f"| {r['method'].upper()} W{r['bits']} g{r['group_size']} asym | {r['ppl']:.3f} | {r['ppl'] - fp:+.3f} "
              f"| {r['seconds']} | {r['peak_rss_mib']} |")
    print(f"\nwrote {save('core', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
