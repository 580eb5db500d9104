"""Quantization wall time against llm-compressor's GPTQ on SmolLM2-135M (issue 17).

Tools: quantkit `--preset gptq`, quantkit's default recipe (GPTQ + AWQ + attention-concentration
importance) and llm-compressor 0.14 GPTQ (bench/peers/quantize_llmcompressor.py in the venv that
bench/peers/make_venvs.sh builds; this script only uses it when its marker file says it is ready).
Recipes: W4 g64 symmetric and W3 g64 asymmetric. Every tool calibrates on the same token ids
(--nsamples × --seqlen windows of ../shared/data/c4-sample.txt, seed 0, drawn by quantkit's own
code and handed to llm-compressor as a file; the windows in each quantkit manifest are checked to
be exactly those ids at the end). Each quantization is one whole process (imports, load,
calibrate, quantize, save) timed from outside, with its own peak RSS. Every child runs under the
same thread setting: OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=--threads (default: the CPUs
this process may use). The runs alternate tool by tool, --reps times (odd repetitions in reverse
order), and the table gives medians and the ratio quantkit / llm-compressor of the medians.

    python bench/speed.py                          # the full protocol: 64 × 512, 3 repetitions
    python bench/speed.py --reps 1 --nsamples 8    # a quick check that everything runs

Times mean something only on a quiet machine: the load average before and after is printed and saved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, require_data, save, timed
from peers import RECIPES, SEED, Setup, assert_same_windows, write_ids

from quantkit.threads import available_cpus

PEERS = ROOT / "bench" / "peers"
PEERS_DIR = Path(os.environ.get("QUANTKIT_PEERS_DIR", Path.home() / ".cache" / "quantkit-peers"))
TOOLS = {"quantkit-gptq": ["--preset", "gptq"], "quantkit-default": [], "llmcompressor-gptq": None}
PEER = "llmcompressor-gptq"


def peer_python() -> str:
    venv = PEERS_DIR / "llmcompressor"
    if not (venv / ".quantkit-ready").is_file():
        sys.exit(f"bench: {venv} is not ready (no .quantkit-ready): build it with bench/peers/make_venvs.sh "
                 "llmcompressor, or leave llmcompressor-gptq out of --tools")
    return str(venv / "bin" / "python")


def command(s: Setup, tool: str, recipe: str, out: Path) -> list[str]:
    bits, group, sym = RECIPES[recipe]
    if tool == PEER:
        return [s.pythons["llmcompressor"], str(PEERS / "quantize_llmcompressor.py"), "--model", s.model,
                "--tokens", str(s.ids_file), "--out", str(out), "--method", "gptq", "--bits", str(bits),
                "--group-size", str(group), "--sym" if sym else "--no-sym"]
    return [sys.executable, "-m", "quantkit", "quantize", s.model, str(out), "--bits", str(bits),
            "--group-size", str(group), "--sym" if sym else "--asym", "--calibration", str(s.calib),
            "--nsamples", str(s.args.nsamples), "--seqlen", str(s.args.seqlen), "--seed", str(SEED),
            "--quiet", "--json", "--force", *TOOLS[tool]]


def run_once(s: Setup, tool: str, recipe: str, env: dict) -> dict:
    out = s.tmp / f"{tool}-{recipe}"
    _, seconds, rss = timed(command(s, tool, recipe, out), env=env)
    if tool != PEER:  # keep the manifest for the same-windows check
        shutil.copy(out / "quantkit.json", s.tmp / f"{out.name}.quantkit.json")
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_rss_mib": rss / 2**20}


def summarize(runs: dict, tools: list[str], recipes: list[str]) -> list[dict]:
    rows = []
    for recipe in recipes:
        peer = statistics.median(r["seconds"] for r in runs[PEER, recipe]) if PEER in tools else None
        for tool in tools:
            seconds = [r["seconds"] for r in runs[tool, recipe]]
            median = statistics.median(seconds)
            rows.append({"tool": tool, "recipe": recipe, "median_s": round(median, 1),
                         "min_s": round(min(seconds), 1), "max_s": round(max(seconds), 1),
                         "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs[tool, recipe])),
                         "vs_llmcompressor": round(median / peer, 3) if peer and tool != PEER else None})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| tool | recipe | median s | min–max s | peak RSS MiB | ÷ llm-compressor |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if r["vs_llmcompressor"] is None else f"{r['vs_llmcompressor']:.2f}×"
        lines.append(f"| {r['tool']} | {r['recipe']} | {r['median_s']:.1f} | {r['min_s']:.1f}–{r['max_s']:.1f} | "
                     f"{r['peak_rss_mib']} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS), metavar="TOOL",
                    help=f"{', '.join(TOOLS)}  [default: all]")
    ap.add_argument("--recipes", nargs="+", default=["w4g64", "w3g64"], choices=list(RECIPES), metavar="RECIPE",
                    help="w4g64 (sym), w3g64, w2g64 (asym)  [default: w4g64 w3g64]")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=available_cpus(), help="OMP_NUM_THREADS of every run")
    ap.add_argument("--model", help="FP model folder  [default: quantkit prepare-model smollm2-135m]")
    ap.add_argument("--name", default="speed", help="results file bench/results/NAME.json")
    args = ap.parse_args()
    if args.reps < 1 or args.nsamples < 1 or args.threads < 1:
        ap.error("--reps, --nsamples and --threads must be at least 1")
    calib = require_data("c4-sample.txt")
    model = args.model or timed([sys.executable, "-m", "quantkit", "prepare-model", "smollm2-135m"])[0].strip().splitlines()[-1]
    pythons = {"llmcompressor": peer_python()} if PEER in args.tools else {}
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads), "TORCH_COMPILE_DISABLE": "1"}
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[dict]] = {(t, r): [] for t in args.tools for r in args.recipes}
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(model, calib, calib, Path(tmp), pythons, args)
        write_ids(s)
        for rep in range(args.reps):
            for recipe in args.recipes:
                for tool in args.tools if rep % 2 == 0 else args.tools[::-1]:
                    runs[tool, recipe].append(run_once(s, tool, recipe, env))
                    print(json.dumps({"rep": rep, "tool": tool, "recipe": recipe, **runs[tool, recipe][-1]}), flush=True)
        assert_same_windows(s)
    load_after = os.getloadavg()
    rows = summarize(runs, args.tools, args.recipes)
    print(f"\n{Path(model).name} · C4 {args.nsamples}×{args.seqlen} (seed {SEED}, same ids in every tool) · "
          f"{args.reps} repetitions, medians · OMP_NUM_THREADS={args.threads} OMP_WAIT_POLICY=PASSIVE · "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (on {os.cpu_count()} CPUs)")
    print(table(rows))
    result = {"args": vars(args), "model": model, "env": env, "loadavg_before": load_before,
              "loadavg_after": load_after, "runs": {f"{t} {r}": v for (t, r), v in runs.items()}, "rows": rows}
    print(f"\nwrote {save(args.name, result)}")


if __name__ == "__main__":
    main()
