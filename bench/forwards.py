"""Forwards per decoder layer, counted (not estimated) on the walk of one layer (issue 17).

For layer 0 of the model, under each recipe: partial forwards (calls of the decoder layer), their
full-layer equivalent (Linear multiply-adds actually run / those of one whole forward over every
calibration batch), Hessian accumulations (``Hessian.add_batch`` calls over all batches) and AWQ
scale searches. Reused blocks (BlockReuse) count only the Linears they run.

    QUANTKIT_SHARED_DATA=/work/shared/data python bench/forwards.py [--model PATH] [--nsamples 16] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import json

import torch

from common import require_data

RECIPES = {
    "gptq": {"method": "gptq", "rotate": False, "importance": "uniform", "awq": False},
    "default": {},
}


def count_layer0(model, adapter, tokens, recipe) -> dict:
    import quantkit.algos.awq as awq
    import quantkit.algos.gptq as gptq
    import quantkit.walk
    from quantkit.walk import walk_layers

    layer = adapter.layers(model)[0]
    counts = {"partial_forwards": 0, "macs": 0, "hessian_batches": 0, "awq_searches": 0}
    linears = {name: layer.get_submodule(name) for name in adapter.linear_names()}
    # forward (post) hooks: a Linear counts only when it ran (a capture pre-hook may stop it first)
    handles = [m.register_forward_hook(
        lambda mod, args, _out: counts.__setitem__("macs", counts["macs"] + args[0].numel() // mod.in_features * mod.weight.numel()))
        for m in linears.values()]
    capture = quantkit.walk.calibration_inputs

    def captured_then_count(*a, **k):  # layer calls from here on (not the embeddings' capture of layer 0's inputs)
        inputs = capture(*a, **k)
        handles.append(layer.register_forward_pre_hook(
            lambda *_: counts.__setitem__("partial_forwards", counts["partial_forwards"] + 1)))
        return inputs

    quantkit.walk.calibration_inputs = captured_then_count
    add_batch, search = gptq.Hessian.add_batch, awq.awq_scale_search

    def counted_add(self, *a, **k):
        counts["hessian_batches"] += 1
        return add_batch(self, *a, **k)

    def counted_search(*a, **k):
        counts["awq_searches"] += 1
        return search(*a, **k)

    gptq.Hessian.add_batch = counted_add
    import quantkit.methods.awq as awq_method

    awq_method.awq_scale_search = counted_search
    try:
        walk = walk_layers(model, adapter, tokens, recipe, torch.device("cpu"), show_progress=False)
        next(walk)
        walk.close()
    finally:
        gptq.Hessian.add_batch, awq_method.awq_scale_search = add_batch, search
        quantkit.walk.calibration_inputs = capture
        for h in handles:
            h.remove()
    full = tokens.numel() * sum(m.weight.numel() for m in linears.values())
    batches = -(-tokens.shape[0] // max(1, 4096 // tokens.shape[1]))
    return {"partial_forwards_per_batch": counts["partial_forwards"] / batches,
            "full_layer_equivalents": round(counts["macs"] / full, 3),
            "hessian_accumulations_per_batch": counts["hessian_batches"] / batches,
            "awq_searches": counts["awq_searches"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: SmolLM2-135M from the quantkit cache)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = ap.parse_args()
    from quantkit.calibration import random_windows
    from quantkit.model import load_model
    from quantkit.recipe import Recipe
    from quantkit.testmodel import prepare

    text = require_data("c4-sample.txt").read_text()
    for name in args.recipes:
        model, tokenizer, adapter = load_model(args.model or str(prepare("smollm2-135m")), torch.float32)
        ids = torch.tensor(tokenizer(text[:2_000_000])["input_ids"])
        tokens = random_windows(ids, args.nsamples, args.seqlen, 0)
        recipe = Recipe(bits=3, group_size=64, sym=False, nsamples=args.nsamples, seqlen=args.seqlen, **RECIPES[name])
        print(json.dumps({"recipe": name, **count_layer0(model, adapter, tokens, recipe)}), flush=True)


if __name__ == "__main__":
    main()
