"""Write the calibration windows quantkit draws from a text (the model's tokenizer, nsamples × seqlen,
seed) to a safetensors file as input_ids int64 [nsamples, seqlen], for the peers. Run with quantkit's python.

    python bench/peers/calibration_ids.py MODEL TEXT OUT.safetensors --nsamples 128 --seqlen 512 --seed 0
"""

import argparse

from safetensors.torch import save_file

from quantkit.calibration import load_text, random_windows, tokenize
from quantkit.model import load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("out")
    ap.add_argument("--nsamples", type=int, required=True)
    ap.add_argument("--seqlen", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    a = ap.parse_args()
    ids = random_windows(tokenize(load_tokenizer(a.model), load_text(a.text)), a.nsamples, a.seqlen, a.seed)
    save_file({"input_ids": ids.contiguous()}, a.out)


if __name__ == "__main__":
    main()
