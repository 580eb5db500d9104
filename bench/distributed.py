"""Single process vs `torchrun --nproc_per_node N` (data-parallel calibration): wall time and peak RSS.

Models: SmolLM2-135M and a generated random Llama of about 1B parameters (hidden 2048,
intermediate 5632, 18 layers, SmolLM2's tokenizer, bfloat16 shards). Recipe: GPTQ W4 g128 sym
with C4 calibration (--nsamples × --seqlen). Each run is a whole process; peak RSS is the
largest single process's (for torchrun: its biggest rank), and the exports are compared byte
for byte (one intra-op thread per process in both runs, as torchrun sets it).

    python bench/distributed.py                         # both models, 2 processes
    python bench/distributed.py --models smollm2-135m --nsamples 32
"""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import quantkit, require_data, save, timed

MAKE_1B = r"""
import sys, torch
from pathlib import Path
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
src, dst = sys.argv[1], Path(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(src)
config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=len(tokenizer), max_position_embeddings=2048,
                     tie_word_embeddings=False, dtype="bfloat16")
with torch.device("meta"):
    model = LlamaForCausalLM(config)
model = model.to_empty(device="cpu").to(torch.bfloat16)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in model.named_parameters():
        p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02)
print(sum(p.numel() for p in model.parameters()))
model.save_pretrained(dst, max_shard_size="1GB")
tokenizer.save_pretrained(dst)
"""


def random_1b(smollm2: str, folder: Path) -> tuple[Path, int]:
    out = subprocess.run([sys.executable, "-c", MAKE_1B, smollm2, str(folder)], check=True, capture_output=True, text=True)
    return folder, int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "random-1b"], choices=["smollm2-135m", "random-1b"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    calib = require_data("c4-sample.txt")
    smollm2 = timed(quantkit("prepare-model", "smollm2-135m"))[0].strip().splitlines()[-1]
    env = {"OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            params = None
            model = smollm2
            if name == "random-1b":
                model, params = random_1b(smollm2, Path(tmp) / "random-1b")
            recipe = ["--bits", "4", "--group-size", "64", "--sym", "--preset", "gptq", "--calibration", str(calib),
                      "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", "cpu", "--quiet"]
            outs = {}
            for mode in ("single", f"torchrun×{args.nproc}"):
                out = Path(tmp) / f"{name}-{len(outs)}"
                cmd = quantkit("quantize", str(model), str(out), *recipe)
                if mode != "single":
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(args.nproc), "-m", "quantkit", "quantize", str(model), str(out), *recipe]
                _, seconds, rss = timed(cmd, env)
                outs[mode] = out
                row = {"model": name, "params": params, "mode": mode, "seconds": round(seconds, 1),
                       "peak_rss_mib": round(rss / 2**20)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            a, b = outs.values()
            same = all(filecmp.cmp(f, b / f.name, shallow=False) for f in sorted(a.glob("*.safetensors")))
            rows[-1]["identical_to_single"] = same
    print(f"\nGPTQ W4 g64 sym, C4 {args.nsamples}×{args.seqlen}, CPU, one thread per process")
    print("| model | mode | wall s | peak RSS MiB (largest process) | export identical |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['seconds']} | {r['peak_rss_mib']} | {r.get('identical_to_single', '–')} |")
    print(f"\nwrote {save('distributed', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
