"""Quality/time/memory table on SmolLM2-135M for any set of recipes (issues: core, RSQ, AWQ).

Protocol: calibrate on ../shared/data/c4-sample.txt (--nsamples × --seqlen tokens, default
128 × 512), evaluate perplexity on the first --eval-tokens (default 32768) tokens of
../shared/data/wikitext2-test.txt (and of each --eval-also text) with windows of --eval-seqlen
(default: --seqlen). Every quantization runs as its own process
(wall seconds and peak RSS are that process's); with several seeds the table shows medians.
Each run is appended to bench/results/NAME.jsonl as it finishes, and runs already there (same
recipe, bits, group, seed and protocol) are not repeated: an interrupted grid resumes, and
several invocations with the same --name (e.g. one per core) fill one grid.

    python bench/quality.py                                   # FP, RTN, GPTQ at W4/W3/W2 g64 asym
    python bench/quality.py --recipes gptq gptq+rotate gptq+attncon rsq --bits 3 2 \\
        --group-sizes 64 -1 --seeds 0 1 2                     # the RSQ table
    python bench/quality.py --recipes rtn rtn+awq gptq gptq+awq rsq rsq+awq --bits 4 3
    python bench/quality.py --name rsq-length --recipes gptq+rotate rsq rsq+li --bits 3 --group-sizes -1 \
        --sym --nsamples 8 --seqlen 512 --eval-seqlen 512 --eval-tokens 4096 \
        --eval-also wikipedia-articles.txt            # issue 19: fixed vs length-invariant floor
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import RESULTS, eval_ppl, quantkit, require_data, save, timed

RECIPES = {
    "rtn": ["--method", "rtn"],
    # built on --preset gptq (uniform importance, no AWQ) so that each name means the same whatever the defaults;
    # attncon names without "+li" are the authors' fixed range [0.005, 1], as in every run recorded before issue 19
    "gptq": ["--preset", "gptq"],
    "gptq+rotate": ["--preset", "gptq", "--rotate"],
    "gptq+attncon": ["--preset", "gptq", "--importance", "attncon", "--importance-map", "fixed"],
    "rsq": ["--preset", "rsq", "--importance-map", "fixed"],
    "rsq+li": ["--preset", "rsq", "--importance-map", "length-invariant"],
    "rsq-paper": ["--preset", "rsq-paper"],  # bits, group, sym, nsamples and seqlen come from this script's flags
    "rtn+awq": ["--method", "rtn", "--awq", "--awq-clip"],
    "gptq+awq": ["--preset", "gptq", "--awq"],
    "gptq+awq+attncon": ["--preset", "gptq", "--awq", "--importance", "attncon", "--importance-map", "fixed"],
    "gptq+awq+rotate": ["--preset", "gptq", "--awq", "--rotate"],
    "rsq+awq": ["--preset", "rsq", "--awq", "--importance-map", "fixed"],
    "rsq+li+awq": ["--preset", "rsq", "--awq", "--importance-map", "length-invariant"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["rtn", "gptq"], choices=sorted(RECIPES))
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--eval-seqlen", type=int, help="evaluation window (default: --seqlen)")
    ap.add_argument("--eval-also", nargs="*", default=[], help="more evaluation texts in ../shared/data (ppl_<name> per run)")
    ap.add_argument("--extra", nargs="*", default=[], help='quantize flags added to every run, quoted: --extra "--importance-min 0.1"')
    ap.add_argument("--fp-ppl", type=float, help="FP32 perplexity already measured with these eval settings (skips it)")
    ap.add_argument("--name", default="quality", help="results file bench/results/NAME.json")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: tabulate the runs of this grid already in NAME.jsonl (needs --fp-ppl)")
    args = ap.parse_args()
    if args.table_only and args.fp_ppl is None:
        ap.error("--table-only needs --fp-ppl")
    calib, test = require_data("c4-sample.txt"), require_data("wikitext2-test.txt")
    others = {Path(name).stem: require_data(name) for name in args.eval_also}
    eval_seqlen = args.eval_seqlen or args.seqlen
    model = None if args.table_only else timed(quantkit("prepare-model", "smollm2-135m"))[0].strip().splitlines()[-1]
    fp = args.fp_ppl or eval_ppl(model, test, eval_seqlen, args.eval_tokens)
    fp_others = {} if args.table_only else {k: eval_ppl(model, v, eval_seqlen, args.eval_tokens) for k, v in others.items()}
    print(f"FP32 ppl {fp:.3f}" + "".join(f", {k} {v:.3f}" for k, v in fp_others.items()), flush=True)
    log = RESULTS / f"{args.name}.jsonl"
    protocol = {"sym": args.sym, "nsamples": args.nsamples, "seqlen": args.seqlen, "eval_tokens": args.eval_tokens,
                "extra": args.extra}
    if args.eval_seqlen:  # keys only when asked, so that grids recorded before them still resume
        protocol["eval_seqlen"] = args.eval_seqlen
    if others:
        protocol["eval_also"] = sorted(others)
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            for group in args.group_sizes:
                for recipe in args.recipes:
                    for seed in args.seeds:
                        key = {"recipe": recipe, "bits": bits, "group_size": group, "seed": seed, **protocol}
                        earlier = [r for r in done if all(r.get(k) == v for k, v in key.items())]
                        if earlier or args.table_only:
                            runs.extend(earlier[-1:])
                            continue
                        out = Path(tmp) / "q"
                        cmd = quantkit("quantize", model, str(out), "--bits", str(bits), "--group-size", str(group),
                                       "--sym" if args.sym else "--asym", "--calibration", str(calib),
                                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                                       "--seed", str(seed), "--rotation-seed", str(seed), "--quiet", "--json", "--force",
                                       *RECIPES[recipe], *(t for e in args.extra for t in e.split()))
                        _, seconds, rss = timed(cmd)
                        run = {**key, "seconds": round(seconds, 1), "peak_rss_mib": round(rss / 2**20),
                               "ppl": eval_ppl(out, test, eval_seqlen, args.eval_tokens),
                               **{f"ppl_{k}": eval_ppl(out, v, eval_seqlen, args.eval_tokens) for k, v in others.items()}}
                        runs.append(run)
                        RESULTS.mkdir(parents=True, exist_ok=True)
                        with log.open("a") as f:
                            f.write(json.dumps(run) + "\n")
                        print(json.dumps(run), flush=True)
    rows = []
    for bits in args.bits:
        for group in args.group_sizes:
            for recipe in args.recipes:
                same = [r for r in runs if (r["recipe"], r["bits"], r["group_size"]) == (recipe, bits, group)]
                if not same:
                    continue
                texts = {f"ppl_{k}": {stat: fn(r[f"ppl_{k}"] for r in same) for stat, fn in
                                      (("median", statistics.median), ("min", min), ("max", max))} for k in others}
                rows.append({"recipe": recipe, "bits": bits, "group_size": group, "seeds": len(same),
                             "ppl": statistics.median(r["ppl"] for r in same),
                             "ppl_min": min(r["ppl"] for r in same), "ppl_max": max(r["ppl"] for r in same), **texts,
                             "seconds": round(statistics.median(r["seconds"] for r in same), 1),
                             "peak_rss_mib": max(r["peak_rss_mib"] for r in same)})
    grid = "sym" if args.sym else "asym"
    print(f"\nSmolLM2-135M · calibration C4 {args.nsamples}×{args.seqlen} · WikiText-2 test (no blank lines)"
          f"{''.join(', ' + k for k in others)}, first {args.eval_tokens} tokens, seqlen {eval_seqlen} · median of "
          f"{len(args.seeds)} seed(s) · {grid}")
    extra_head = "".join(f" {k} ppl (median) | min – max |" for k in others)
    print(f"| recipe | bits | group | seeds | ppl (median) | min – max | Δ vs FP |{extra_head} quantize s | peak RSS MiB |\n"
          "|---|---|---|---|---|---|---|" + "---|---|" * len(others) + "---|---|")
    print(f"| FP32 | 32 | – | – | {fp:.3f} | – | – |" + "".join(f" {fp_others.get(k, float('nan')):.3f} | – |" for k in others)
          + " – | – |")
    for r in rows:
        group = "channel" if r["group_size"] == -1 else r["group_size"]
        cells = "".join(f" {r[f'ppl_{k}']['median']:.3f} | {r[f'ppl_{k}']['min']:.2f} – {r[f'ppl_{k}']['max']:.2f} |"
                        for k in others)
        print(f"| {r['recipe']} | {r['bits']} | {group} | {r['seeds']} | {r['ppl']:.3f} | {r['ppl_min']:.2f} – "
              f"{r['ppl_max']:.2f} | {r['ppl'] - fp:+.3f} |{cells} {r['seconds']} | {r['peak_rss_mib']} |")
    if not args.table_only:
        print(f"\nwrote {save(args.name, {'args': vars(args), 'fp_ppl': fp, 'fp_ppl_also': fp_others, 'runs': runs, 'rows': rows})}")


if __name__ == "__main__":
    main()
