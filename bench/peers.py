"""Side by side with the peers: quantkit vs GPTQModel vs llm-compressor on SmolLM2-135M.

Protocol: every tool calibrates on the same token ids — --nsamples × --seqlen (default 128 × 512)
windows of ../shared/data/c4-sample.txt drawn with seed 0 by quantkit's own code
(quantkit.calibration) and handed to the peers as a safetensors file; at the end the script asserts
that the windows each quantkit run's recipe (its manifest) draws are exactly those ids. Every checkpoint is
then evaluated by one evaluator, `quantkit eval --dtype float32` (quantkit's loader reads GPTQ v1 and
compressed-tensors pack-quantized), with the FP model's tokenizer copied into each output, on the
first --eval-tokens (default 32768) tokens of ../shared/data/wikitext2-test.txt, seqlen --seqlen.
Each quantization is one process (peers: their venv's python with bench/peers/quantize_*.py):
wall seconds and peak RSS are that whole process's, imports and model loading included. Peers
quantize in float32 like quantkit on CPU; quantkit tokenizes the calibration text itself (inside
its timing), the peers read ready ids. A peer that fails keeps its row, with the error's line.

    python bench/peers.py                                       # full protocol, every tool and recipe
    python bench/peers.py --tools quantkit-gptq gptqmodel-gptq llmcompressor-gptq --recipes w3g64
    python bench/peers.py --model /tmp/tiny --nsamples 4 --seqlen 64 --eval-tokens 1024 --name peers-tiny

The first GPTQModel run on a machine also compiles its pack_block_cpu extension (~3 min on 2
cores, bench/peers/FORMATS.md): warm it up (e.g. with the tiny run) before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, eval_ppl, quantkit, require_data, save, timed
from quality import RECIPES as QUANTKIT_RECIPES

PEERS = ROOT / "bench" / "peers"
SEED = 0
RECIPES = {"w4g64": (4, 64, True), "w3g64": (3, 64, False), "w2g64": (2, 64, False)}  # bits, group, sym
TOOLS = {  # name: (venv or "quantkit", method)
    "quantkit-gptq": ("quantkit", "gptq"),
    "quantkit-rotate": ("quantkit", "gptq+rotate"),
    "quantkit-rsq": ("quantkit", "rsq"),
    "quantkit-awq": ("quantkit", "gptq+awq"),
    "gptqmodel-gptq": ("gptqmodel", "gptq"),
    "llmcompressor-gptq": ("llmcompressor", "gptq"),
    "llmcompressor-awq": ("llmcompressor", "awq"),
    "llmcompressor-spinquant": ("llmcompressor", "spinquant"),
    "llmcompressor-quip": ("llmcompressor", "quip"),
}
PEER_ENV = {"GPTQMODEL_CPU_WORKERS": str(os.cpu_count() or 1), "TORCH_COMPILE_DISABLE": "1"}
PEER_PACKAGES = ("torch", "transformers", "gptqmodel", "optimum", "llmcompressor", "compressed-tensors")


def peer_pythons(venvs: set[str]) -> dict[str, str]:
    """{venv name: its python}, creating missing venvs with bench/peers/make_venvs.sh."""
    if not venvs:
        return {}
    out = subprocess.run(["bash", str(PEERS / "make_venvs.sh"), *sorted(venvs)], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return {name: str(Path(path) / "bin" / "python") for name, path in (line.split("\t") for line in out.splitlines())}


def peer_versions(python: str) -> list[str]:
    freeze = Path(python).parents[1] / ".quantkit-freeze.txt"
    return [line for line in freeze.read_text().splitlines() if line.split("==")[0].lower() in PEER_PACKAGES]


@dataclass
class Setup:
    """What every run shares. The bench process itself stays free of torch while it times children:
    a child's peak RSS (ru_maxrss) also counts the parent's resident memory at fork."""

    model: str
    calib: Path
    test: Path
    tmp: Path
    pythons: dict[str, str]
    args: argparse.Namespace

    @property
    def ids_file(self) -> Path:
        return self.tmp / "calibration.safetensors"


def write_ids(s: Setup) -> None:
    timed([sys.executable, str(PEERS / "calibration_ids.py"), s.model, str(s.calib), str(s.ids_file),
           "--nsamples", str(s.args.nsamples), "--seqlen", str(s.args.seqlen), "--seed", str(SEED)])


def assert_same_windows(s: Setup) -> None:
    """The recipe in each finished quantkit run's manifest draws exactly the ids the peers got (after all timings)."""
    import torch
    from safetensors.torch import load_file

    from quantkit.model import load_tokenizer
    from quantkit.job import calibration_tokens
    from quantkit.recipe import Recipe

    ids, tokenizer = load_file(s.ids_file)["input_ids"], load_tokenizer(s.model)
    for manifest in sorted(s.tmp.glob("*.quantkit.json")):
        recipe = Recipe.from_dict(json.loads(manifest.read_text())["recipe"])
        assert torch.equal(calibration_tokens(tokenizer, str(s.calib), recipe)[0], ids), f"{manifest}: other windows"


def perplexity(s: Setup, model: Path | str) -> float:
    return eval_ppl(model, s.test, s.args.seqlen, s.args.eval_tokens)


def quantize_cmd(s: Setup, tool: str, recipe: str, out: Path) -> list[str]:
    venv, method = TOOLS[tool]
    bits, group, sym = RECIPES[recipe]
    if venv == "quantkit":
        return quantkit("quantize", s.model, str(out), "--bits", str(bits), "--group-size", str(group),
                        "--sym" if sym else "--asym", "--calibration", str(s.calib), "--nsamples", str(s.args.nsamples),
                        "--seqlen", str(s.args.seqlen), "--seed", str(SEED), "--quiet", "--json", "--force",
                        *QUANTKIT_RECIPES[method])
    return [s.pythons[venv], str(PEERS / f"quantize_{venv}.py"), "--model", s.model, "--tokens", str(s.ids_file),
            "--out", str(out), "--method", method, "--bits", str(bits), "--group-size", str(group),
            "--sym" if sym else "--no-sym"]


def run_one(s: Setup, tool: str, recipe: str) -> dict:
    """Quantize with one tool and recipe, then evaluate; a failure is recorded as its error's last line."""
    out = s.tmp / f"{tool}-{recipe}"
    bits, group, sym = RECIPES[recipe]
    row = {"tool": tool, "recipe": recipe, "bits": bits, "group_size": group, "sym": sym}
    ours = TOOLS[tool][0] == "quantkit"
    stage = "quantize"
    try:
        _, seconds, rss = timed(quantize_cmd(s, tool, recipe, out), env=None if ours else PEER_ENV)
        row.update(seconds=round(seconds, 1), peak_rss_mib=round(rss / 2**20))
        if ours:
            shutil.copy(out / "quantkit.json", s.tmp / f"{out.name}.quantkit.json")
        for f in Path(s.model).glob("tokenizer*"):
            shutil.copy(f, out)
        stage = "eval"
        row["ppl"] = perplexity(s, out)
    except RuntimeError as e:
        row["error"] = f"{stage}: {str(e).strip().splitlines()[-1]}"
    shutil.rmtree(out, ignore_errors=True)
    return row


def add_ratios(rows: list[dict], fp: float) -> None:
    """Each peer row gets quantkit/peer ratios of quantize seconds and of Δppl, per quantkit tool, same recipe."""
    ours = [r for r in rows if TOOLS[r["tool"]][0] == "quantkit"]
    for r in rows:
        if TOOLS[r["tool"]][0] == "quantkit" or "seconds" not in r:
            continue
        r["ratios"] = {}
        for q in (q for q in ours if q["recipe"] == r["recipe"] and "seconds" in q):
            both = "ppl" in q and "ppl" in r and r["ppl"] != fp
            r["ratios"][q["tool"]] = {"seconds": round(q["seconds"] / r["seconds"], 3),
                                      "delta_ppl": round((q["ppl"] - fp) / (r["ppl"] - fp), 3) if both else None}


def table(rows: list[dict], fp: float, ours: list[str]) -> str:
    def cell(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    head = ["tool", "recipe", "ppl", "Δ vs FP", "quantize s", "peak RSS MiB"]
    head += [f"{q}/peer {what}" for q in ours for what in ("s", "Δppl")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| FP32 | – | {fp:.3f} | – | – | – |" + " – |" * (2 * len(ours))]
    for r in rows:
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "FAILED " + r["error"].replace("|", "\\|")
        delta = cell(r["ppl"] - fp if "ppl" in r else None, "+.3f")
        ratios = [cell(r.get("ratios", {}).get(q, {}).get(what), ".2f") for q in ours for what in ("seconds", "delta_ppl")]
        cells = [r["tool"], r["recipe"], ppl, delta, cell(r.get("seconds"), ".1f"), cell(r.get("peak_rss_mib"), "d"), *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", nargs="+", default=list(TOOLS), choices=list(TOOLS), metavar="TOOL",
                    help=f"{', '.join(TOOLS)}  [default: all]")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), metavar="RECIPE",
                    help="w4g64 (sym), w3g64, w2g64 (asym)  [default: all]")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window and evaluation window")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--model", help="FP model folder  [default: quantkit prepare-model smollm2-135m]")
    ap.add_argument("--fp-ppl", type=float, help="FP32 perplexity already measured with these eval settings (skips it)")
    ap.add_argument("--name", default="peers", help="results file bench/results/NAME.json")
    args = ap.parse_args()
    calib, test = require_data("c4-sample.txt"), require_data("wikitext2-test.txt")
    model = args.model or timed(quantkit("prepare-model", "smollm2-135m"))[0].strip().splitlines()[-1]
    pythons = peer_pythons({TOOLS[t][0] for t in args.tools} - {"quantkit"})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        s = Setup(model, calib, test, Path(tmp), pythons, args)
        write_ids(s)
        fp = args.fp_ppl or perplexity(s, model)
        print(f"FP32 ppl {fp:.3f}", flush=True)
        for recipe in args.recipes:
            for tool in args.tools:
                rows.append(run_one(s, tool, recipe))
                print(json.dumps(rows[-1]), flush=True)
        assert_same_windows(s)
    add_ratios(rows, fp)
    ours = [t for t in args.tools if TOOLS[t][0] == "quantkit"]
    print(f"\n{Path(model).name} · calibration C4 {args.nsamples}×{args.seqlen} (seed {SEED}, same ids in every tool) · "
          f"WikiText-2 test, first {args.eval_tokens} tokens, seqlen {args.seqlen} · quantkit eval float32 · "
          "w4 sym, w3/w2 asym")
    print(table(rows, fp, ours))
    versions = {venv: peer_versions(python) for venv, python in pythons.items()}
    result = {"args": vars(args), "model": model, "fp_ppl": fp, "peer_versions": versions, "rows": rows}
    print(f"\nwrote {save(args.name, result)}")


if __name__ == "__main__":
    main()
