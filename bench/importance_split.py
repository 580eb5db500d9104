"""Where the attncon-weighted Hessian's mass goes, by window length (issue 19).

SmolLM2-135M in full precision, random C4 windows of T = 256, 512, 2048, 4096 tokens (the same
number of tokens at every T). For each decoder layer: r = attention concentration of its inputs,
w = map_importance(r) with the authors' fixed range [0.005, 1] and with the length-invariant floor
(0.005 at 4096, scaled by 4096/T), x = the input of q/k/v (after input_layernorm). Prints the share
of tr(H) = Σ w_t ‖x_t‖² taken by position 0 (the attention sink) and by floor-weight tokens
(weight ≤ 2 × the window's lowest), and the same shares of Σ w_t alone (as if every ‖x_t‖ were equal),
and the effective-token fraction (Σ w)² / (T Σ w²) (Kish): median and range over layers 15–29 and
the median over all layers.

    OMP_NUM_THREADS=1 python bench/importance_split.py --tokens 8192
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import require_data, save
from quantkit.algos.importance import (
    REFERENCE_LENGTH,
    attention_concentration,
    effective_tokens,
    hessian_split,
    length_invariant_floor,
    map_importance,
)
from quantkit.calibration import load_text, random_windows, tokenize
from quantkit.model import load_model
from quantkit.walk.capture import capture_inputs, capture_qk, layer_outputs
from quantkit.testmodel import prepare

MAPS = {"fixed [0.005, 1]": None, "length-invariant": REFERENCE_LENGTH}


@torch.no_grad()
def layer_shares(model, adapter, tokens: torch.Tensor) -> dict[str, list[tuple[float, ...]]]:
    """Per mapping, for every layer: (sink share, floor share) of tr(H), then of Σ w alone, then the
    effective-token fraction (Σ w)² / (T Σ w²), averaged over the windows tokens [S, T]."""
    device = torch.device("cpu")
    inputs = capture_inputs(model, adapter, tokens, device, max(1, 4096 // tokens.shape[1]), device)
    shares = {name: [] for name in MAPS}
    t = tokens.shape[1]
    for layer in adapter.layers(model):
        layer.float()
        per_map = {name: [] for name in MAPS}
        for x in inputs.batches():
            q, k, mask, scaling = capture_qk(layer, adapter, x, inputs.kwargs)
            r = attention_concentration(q, k, scaling, mask)
            sqnorm = layer.input_layernorm(x).float().square().sum(-1)
            for name, reference in MAPS.items():
                w = map_importance(r, 0.005, 1.0, reference)
                split = hessian_split(w, sqnorm) + hessian_split(w, torch.ones_like(w)) + (effective_tokens(w) / t,)
                per_map[name] += list(zip(*(v.tolist() for v in split)))
        for name, pairs in per_map.items():
            shares[name].append(tuple(statistics.mean(p[i] for p in pairs) for i in range(5)))
        inputs.hidden = layer_outputs(layer, inputs)
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 2048, 4096])
    ap.add_argument("--tokens", type=int, default=8192, help="calibration tokens per length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--first-layer", type=int, default=15, help="range over layers from this one on")
    args = ap.parse_args()
    model, tokenizer, adapter = load_model(str(prepare("smollm2-135m")))
    model.eval()
    ids = tokenize(tokenizer, load_text(str(require_data("c4-sample.txt")), "calibration"))
    rows = []
    print("Shares: median over layers ≥ 15 (their range); median over all layers. tr H weighs each token "
          "by w_t ‖x_t‖², Σ w by w_t alone.\n"
          "| T | mapping | floor | sink, tr H | floor tokens, tr H | sink, Σ w | floor tokens, Σ w | effective tokens / T |\n"
          "|---|---|---|---|---|---|---|---|")
    for t in args.lengths:
        tokens = random_windows(ids, max(1, args.tokens // t), t, args.seed)
        for name, shares in layer_shares(model, adapter, tokens).items():
            late = shares[args.first_layer:]
            cells = []
            for i in range(5):
                vals = [s[i] for s in late]
                cells.append(f"{statistics.median(vals):.1%} ({min(vals):.1%}–{max(vals):.1%}); "
                             f"{statistics.median(s[i] for s in shares):.1%}")
            floor = 0.005 if MAPS[name] is None else length_invariant_floor(0.005, 1.0, t)
            print(f"| {t} | {name} | {floor:.3g} | {' | '.join(cells)} |", flush=True)
            rows.append({"T": t, "map": name, "floor": floor, "windows": tokens.shape[0],
                         **{key: [s[i] for s in shares] for i, key in enumerate(
                             ("sink_share_H", "floor_share_H", "sink_share_w", "floor_share_w", "effective_fraction"))}})
    print(f"\nwrote {save('importance-split', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
