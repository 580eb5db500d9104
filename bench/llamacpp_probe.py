"""llama.cpp's side of the GGUF checks, run with the llamacpp venv's Python (llama-cpp-python, numpy; no torch).

  python bench/llamacpp_probe.py tokenize MODEL.gguf TEXT_FILE          -> {"ids": [...]}  (no BOS, no special parsing)
  python bench/llamacpp_probe.py perplexity MODEL.gguf IDS_JSON SEQLEN  -> {"perplexity": p, "tokens": n}
  python bench/llamacpp_probe.py logits MODEL.gguf IDS_JSON OUT.npy     -> logits [T, vocab] of one sequence

Perplexity is quantkit's protocol (non-overlapping windows of SEQLEN, each predicting its tokens 2..SEQLEN)
on the token ids given, so both sides score the same tokens; logits come from one forward pass with
logits_all. One JSON object on stdout; llama.cpp's log goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from llama_cpp import Llama

THREADS = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)


def _load(path: str, n_ctx: int, vocab_only: bool = False) -> Llama:
    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=not vocab_only,
                 vocab_only=vocab_only, n_threads=THREADS, n_threads_batch=THREADS, verbose=False, seed=0)


def _forward(llm: Llama, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] (float32) of one sequence from an empty cache."""
    llm.reset()  # eval drops the cache from position n_tokens = 0 on
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main(argv: list[str]) -> dict:
    cmd, model = argv[0], argv[1]
    if cmd == "tokenize":
        text = open(argv[2], encoding="utf-8").read()
        return {"ids": _load(model, 64, vocab_only=True).tokenize(text.encode("utf-8"), add_bos=False, special=False)}
    ids = json.load(open(argv[2]))
    if cmd == "logits":
        np.save(argv[3], _forward(_load(model, len(ids)), ids))
        return {"tokens": len(ids)}
    if cmd == "perplexity":
        seqlen = int(argv[3])
        llm = _load(model, seqlen)
        nll, count = 0.0, 0
        for w in range(len(ids) // seqlen):
            window = ids[w * seqlen : (w + 1) * seqlen]
            logp = _log_softmax(_forward(llm, window)[:-1])
            nll -= float(logp[np.arange(seqlen - 1), window[1:]].sum())
            count += seqlen - 1
        return {"perplexity": float(np.exp(nll / count)), "tokens": (len(ids) // seqlen) * seqlen}
    raise SystemExit(f"unknown command {cmd!r} (tokenize, perplexity, logits)")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
