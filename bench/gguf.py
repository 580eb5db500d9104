"""GGUF on SmolLM2-135M: llama.cpp's own quantizer (with and without an imatrix) vs quantkit's GPTQ + AWQ
export of the same GGUF type, every perplexity measured by llama.cpp itself.

Protocol: calibration text ../shared/data/c4-sample.txt for both sides (llama-imatrix reads its first
--nsamples chunks of --seqlen tokens; quantkit draws --nsamples random windows of --seqlen from it);
perplexity on the first --eval-tokens tokens of wikitext2-test.txt (Hugging Face tokenizer ids, the
same ids for every file), non-overlapping windows of 512, in llama.cpp (bench/llamacpp_probe.py).
llama.cpp's files: llama-quantize --pure (every Linear on the type, no k-quant mixture) with
--token-embedding-type q8_0, which is what quantkit writes for SmolLM2 (tied embeddings whose rows
of 576 are no multiple of 256 → Q8_0; rows of 576 take llama.cpp's fallback, Q4_K → Q5_0 and
Q3_K → Q4_0, on both sides: the script checks that both files hold the same tensor types).
Needs the llamacpp venv (bash bench/peers/make_venvs.sh llamacpp). Intermediate files are kept in
--work (default ~/.cache/quantkit/gguf-bench), so per-type invocations can run side by side.

    python bench/gguf.py                        # Q4_0, Q4_K, Q3_K
    python bench/gguf.py --types Q3_K --nsamples 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, quantkit, require_data, save, timed  # noqa: E402

# this script is bench/gguf.py: drop bench/ from the path so that `import gguf` finds the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

PEERS_DIR = Path(os.environ.get("QUANTKIT_PEERS_DIR") or Path.home() / ".cache" / "quantkit-peers")
VENV = PEERS_DIR / "llamacpp"
TOOLS = VENV / "llama.cpp"
PROBE = ROOT / "bench" / "llamacpp_probe.py"


def probe(*args: str) -> dict:
    out = subprocess.run([str(VENV / "bin" / "python"), str(PROBE), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"llamacpp_probe {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def tool(name: str, *args: str) -> float:
    """Run a llama.cpp tool; its wall seconds."""
    _, seconds, _ = timed([str(TOOLS / name), *args])
    return seconds


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K", "Q3_K"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "quantkit" / "gguf-bench")
    ap.add_argument("--name", default="gguf", help="results file bench/results/NAME.json")
    ap.add_argument("--llama-only", action="store_true", help="only llama.cpp's own files (no quantkit runs, no table)")
    args = ap.parse_args()
    if not (VENV / ".quantkit-ready").is_file():
        sys.exit(f"bench: {VENV} not built: run bash bench/peers/make_venvs.sh llamacpp")
    calib, test = require_data("c4-sample.txt"), require_data("wikitext2-test.txt")
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    model = timed(quantkit("prepare-model", "smollm2-135m"))[0].strip().splitlines()[-1]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    import torch  # noqa: F401  (after the timed children: they measure their own memory)
    from transformers import AutoModelForCausalLM

    from quantkit.calibration import load_text, tokenize
    from quantkit.formats.gguf import export_fp
    from quantkit.model import load_tokenizer

    ids = work / f"wikitext2-{args.eval_tokens}.json"
    if not ids.is_file():
        ids.write_text(json.dumps(tokenize(load_tokenizer(model), load_text(str(test)))[: args.eval_tokens].tolist()))
    fp = work / "smollm2-f32.gguf"
    if not fp.is_file():
        export_fp(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), model, fp)
    imatrix = work / f"imatrix-{args.nsamples}x{args.seqlen}.gguf"
    if not imatrix.is_file():
        tool("llama-imatrix", "-m", str(fp), "-f", str(calib), "-o", str(imatrix), "-c", str(args.seqlen),
             "--chunks", str(args.nsamples), "-t", threads)

    cache_file = work / "perplexities.json"  # {path in --work: [size, mtime, ids file, ppl]}: reruns skip measured files

    def read_cache() -> dict:
        return json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    cache = read_cache()

    def ppl(path: Path) -> float:
        name, key = str(path.relative_to(work)), [path.stat().st_size, path.stat().st_mtime, ids.name]
        if cache.get(name, [None] * 3)[:3] != key:
            value = probe("perplexity", str(path), str(ids), "512")["perplexity"]
            cache.update(read_cache())  # what side-by-side invocations measured meanwhile
            cache[name] = key + [value]
            cache_file.write_text(json.dumps(cache, indent=1))
        return cache[name][3]

    rows = []
    fp_ppl = ppl(fp)
    print(f"F32 perplexity (llama.cpp) {fp_ppl:.3f}", file=sys.stderr)
    for gguf_type in args.types:
        row = {"type": gguf_type}
        files = {}
        for label, extra in (("llama.cpp", []), ("llama.cpp+imatrix", ["--imatrix", str(imatrix)])):
            out = work / f"llamacpp-{gguf_type}{'-imatrix' if extra else ''}.gguf"
            if not out.is_file():
                tool("llama-quantize", "--pure", "--token-embedding-type", "q8_0", *extra, str(fp), str(out), gguf_type, threads)
            files[label] = out
        if args.llama_only:
            for label, path in files.items():
                print(f"{gguf_type} {label}: ppl {ppl(path):.3f}", file=sys.stderr)
            continue
        ours_dir = work / f"quantkit-{gguf_type}-{args.nsamples}x{args.seqlen}"
        if not ours_dir.is_dir():
            _, seconds, _ = timed(quantkit("quantize", model, str(ours_dir), "--gguf-type", gguf_type, "--calibration",
                                           str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                                           "--restart", "--quiet", "--json"))  # never resume a partial of older code
            row["quantkit_seconds"] = round(seconds, 1)
        files["quantkit gptq+awq"] = ours_dir / f"model-{gguf_type}.gguf"
        types = {label: tensor_types(path) for label, path in files.items()}
        row["same_tensor_types"] = all(t == types["llama.cpp"] for t in types.values())
        for label, path in files.items():
            row[label] = ppl(path)
            row[f"{label} MiB"] = round(path.stat().st_size / 2**20, 2)
            print(f"{gguf_type} {label}: ppl {row[label]:.3f}", file=sys.stderr)
        rows.append(row)
    if args.llama_only:
        return
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "fp_ppl": fp_ppl, "rows": rows}
    save(args.name, result)
    print("| type | llama.cpp RTN | llama.cpp + imatrix | quantkit GPTQ + AWQ | same tensor types |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['type']} | {r['llama.cpp']:.3f} | {r['llama.cpp+imatrix']:.3f} | {r['quantkit gptq+awq']:.3f} | "
              f"{r['same_tensor_types']} |")
    print(f"F32: {fp_ppl:.3f} (WikiText-2 test, first {args.eval_tokens} tokens, seqlen 512, llama.cpp)")


if __name__ == "__main__":
    main()
