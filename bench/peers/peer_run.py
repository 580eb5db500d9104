"""Shared plumbing of the peer-side quantize scripts (run with a peer venv's python by bench/peers.py).

Every script takes the same arguments, reads the calibration token ids that bench/peers.py produced
with quantkit's own tokenizer code, and on failure ends stderr with one line 'ExcType: message'.
"""

import argparse
import sys
import traceback


def parse_args(doc: str, methods: tuple[str, ...]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--model", required=True, help="FP Hugging Face folder")
    ap.add_argument("--tokens", required=True, help="safetensors file holding input_ids int64 [nsamples, seqlen]")
    ap.add_argument("--out", required=True, help="output folder of the quantized checkpoint")
    ap.add_argument("--method", choices=methods, required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--sym", action=argparse.BooleanOptionalAction, required=True)
    return ap.parse_args()


def calibration_ids(path: str) -> list[list[int]]:
    from safetensors.torch import load_file

    return load_file(path)["input_ids"].tolist()


def run(quantize, doc: str, methods: tuple[str, ...]) -> None:
    """quantize(args); a failure prints its traceback, then 'ExcType: first line' last, and exits 1."""
    args = parse_args(doc, methods)
    try:
        quantize(args)
    except Exception as e:  # noqa: BLE001 - any peer failure is a result to record
        traceback.print_exc()
        message = str(e).strip()
        sys.exit(f"{type(e).__name__}: {message.splitlines()[0] if message else ''}")
