"""Quality/time/memory table on SmolLM2-135M for any set of recipes (issues: core, RSQ, AWQ).

Protocol: calibrate on ../shared/data/c4-sample.txt (--nsamples × --seqlen tokens, default
128 × 512; with several --seqlen and --calib-tokens N, N // seqlen windows at each length), evaluate
perplexity on the first --eval-tokens (default 32768) tokens of ../shared/data/wikitext2-test.txt (and
of each --eval-also text) with windows of --eval-seqlen (default: --seqlen). The seed picks the
calibration windows and the rotation. Every quantization runs as its own process (wall seconds and
peak RSS are that process's); with several seeds the table shows medians and ranges. Runs go seed by
seed (every recipe and length at seed 0 first), so an early stop leaves whole slices.
Each run is appended to bench/results/NAME.jsonl as it finishes, and runs already there (same
recipe, bits, group, seed and protocol) are not repeated: an interrupted grid resumes. Several
invocations with the same --name (e.g. one per core) fill one grid together: each claims a run
before starting it (a lock file under the temp folder), and reads the others' rows before each run.

    python bench/quality.py                                   # FP, RTN, GPTQ at W4/W3/W2 g64 asym
    python bench/quality.py --recipes gptq gptq+rotate gptq+attncon rsq --bits 3 2 \\
        --group-sizes 64 -1 --seeds 0 1 2                     # the RSQ table
    python bench/quality.py --recipes rtn rtn+awq gptq gptq+awq rsq rsq+awq --bits 4 3
    python bench/quality.py --name rsq-length --recipes gptq+rotate rsq rsq+li --bits 3 --group-sizes -1 \
        --sym --nsamples 8 --seqlen 512 --eval-seqlen 512 --eval-tokens 4096 \
        --eval-also wikipedia-articles.txt            # issue 19: fixed vs length-invariant floor
    python bench/quality.py --name rsq-length-grid --recipes gptq+rotate rsq rsq+li --bits 3 --group-sizes -1 \
        --sym --calib-tokens 16384 --seqlen 512 2048 --eval-seqlen 512 --eval-tokens 4096 --seeds 0 1 2 \
        --eval-also wikipedia-articles.txt            # issue 19's grid: 32×512 against 8×2048
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
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
    # the code's default recipe (GPTQ + AWQ + attncon, length-invariant), spelled out so it stays fixed
    "gptq+awq+li": ["--preset", "gptq", "--awq", "--importance", "attncon", "--importance-map", "length-invariant"],
}


CLAIMS = Path(tempfile.gettempdir()) / "quantkit-bench-claims"


def claim(name: str, key: dict) -> Path | None:
    """Lock file for one run of grid ``name`` (None: another live process holds it). A lock whose
    process has died is taken over, so a killed invocation's run is redone by the next one."""
    path = CLAIMS / name / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest() + ".pid")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return None
            except (ProcessLookupError, ValueError):
                path.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return path
    return None


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", default=["rtn", "gptq"], choices=sorted(RECIPES))
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--sym", action="store_true", help="symmetric grids (default asymmetric)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    calib_size = ap.add_mutually_exclusive_group()
    calib_size.add_argument("--nsamples", type=int, help="calibration windows at every length (default 128)")
    calib_size.add_argument("--calib-tokens", type=int, help="calibration tokens: calib_tokens // seqlen windows per length")
    ap.add_argument("--seqlen", type=int, nargs="+", default=[512], help="calibration window length(s)")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--eval-seqlen", type=int, help="evaluation window (default: --seqlen; needed with several)")
    ap.add_argument("--eval-also", nargs="*", default=[], help="more evaluation texts in ../shared/data (ppl_<name> per run)")
    ap.add_argument("--extra", nargs="*", default=[], help='quantize flags added to every run, quoted: --extra "--importance-min 0.1"')
    ap.add_argument("--fp-ppl", type=float, help="FP32 perplexity already measured with these eval settings (skips it)")
    ap.add_argument("--baseline", choices=sorted(RECIPES),
                    help="also tabulate each recipe's perplexity ÷ this recipe's, paired by seed, bits, group and length")
    ap.add_argument("--name", default="quality", help="results file bench/results/NAME.json")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: tabulate the runs of this grid already in NAME.jsonl (needs --fp-ppl)")
    args = ap.parse_args()
    if args.table_only and args.fp_ppl is None:
        ap.error("--table-only needs --fp-ppl")
    if len(args.seqlen) > 1 and not args.eval_seqlen:
        ap.error("several --seqlen need one --eval-seqlen, so that every length is evaluated alike")
    if args.calib_tokens and args.calib_tokens < max(args.seqlen):
        ap.error(f"--calib-tokens {args.calib_tokens} is less than one window of --seqlen {max(args.seqlen)}")
    calib, test = require_data("c4-sample.txt"), require_data("wikitext2-test.txt")
    others = {Path(name).stem: require_data(name) for name in args.eval_also}
    eval_seqlen = args.eval_seqlen or args.seqlen[0]
    model = None if args.table_only else timed(quantkit("prepare-model", "smollm2-135m"))[0].strip().splitlines()[-1]
    fp = args.fp_ppl or eval_ppl(model, test, eval_seqlen, args.eval_tokens)
    fp_others = {} if args.table_only else {k: eval_ppl(model, v, eval_seqlen, args.eval_tokens) for k, v in others.items()}
    print(f"FP32 ppl {fp:.3f}" + "".join(f", {k} {v:.3f}" for k, v in fp_others.items()), flush=True)
    log = RESULTS / f"{args.name}.jsonl"
    base = {"sym": args.sym, "eval_tokens": args.eval_tokens, "extra": args.extra}
    if args.eval_seqlen:  # keys only when asked, so that grids recorded before them still resume
        base["eval_seqlen"] = args.eval_seqlen
    if others:
        base["eval_also"] = sorted(others)
    lengths = {t: args.calib_tokens // t if args.calib_tokens else args.nsamples or 128 for t in args.seqlen}
    # seed-major order: a grid stopped early has every recipe and length at the first seeds
    grid = [{"recipe": recipe, "bits": bits, "group_size": group, "seed": seed, "nsamples": lengths[t], "seqlen": t,
             **base}
            for seed in args.seeds for bits in args.bits for group in args.group_sizes for t in args.seqlen
            for recipe in args.recipes]
    with tempfile.TemporaryDirectory() as tmp:
        for key in grid:
            if args.table_only or any(all(r.get(k) == v for k, v in key.items()) for r in read_log(log)):
                continue
            lock = claim(args.name, key)
            if lock is None or any(all(r.get(k) == v for k, v in key.items()) for r in read_log(log)):
                continue  # another invocation runs it, or finished it since the check above
            try:
                out = Path(tmp) / "q"
                cmd = quantkit("quantize", model, str(out), "--bits", str(key["bits"]),
                               "--group-size", str(key["group_size"]), "--sym" if args.sym else "--asym",
                               "--calibration", str(calib), "--nsamples", str(key["nsamples"]),
                               "--seqlen", str(key["seqlen"]), "--seed", str(key["seed"]),
                               "--rotation-seed", str(key["seed"]), "--quiet", "--json", "--force",
                               *RECIPES[key["recipe"]], *(t for e in args.extra for t in e.split()))
                _, seconds, rss = timed(cmd)
                run = {**key, "seconds": round(seconds, 1), "peak_rss_mib": round(rss / 2**20),
                       "ppl": eval_ppl(out, test, eval_seqlen, args.eval_tokens),
                       **{f"ppl_{k}": eval_ppl(out, v, eval_seqlen, args.eval_tokens) for k, v in others.items()}}
                RESULTS.mkdir(parents=True, exist_ok=True)
                with log.open("a") as f:
                    f.write(json.dumps(run) + "\n")
                print(json.dumps(run), flush=True)
            finally:
                lock.unlink(missing_ok=True)
    done = read_log(log)
    runs = [[r for r in done if all(r.get(k) == v for k, v in key.items())][-1:] for key in grid]
    runs = [r[0] for r in runs if r]
    rows = []
    cells = {(k["recipe"], k["bits"], k["group_size"], k["seqlen"]): k["nsamples"] for k in grid}
    for (recipe, bits, group, t), n in cells.items():
        same = [r for r in runs if (r["recipe"], r["bits"], r["group_size"], r["seqlen"]) == (recipe, bits, group, t)]
        if not same:
            continue
        rows.append({"recipe": recipe, "bits": bits, "group_size": group, "nsamples": n, "seqlen": t,
                     "seeds": sorted(r["seed"] for r in same), **{
                         text: spread([r[text] for r in same]) for text in ["ppl", *(f"ppl_{k}" for k in others)]},
                     "seconds": round(statistics.median(r["seconds"] for r in same), 1),
                     "peak_rss_mib": max(r["peak_rss_mib"] for r in same)})
    texts = ["ppl", *(f"ppl_{k}" for k in others)]
    if args.baseline:
        for r in rows:
            pairs = [(run, base) for run in runs for base in runs if base["recipe"] == args.baseline
                     and run["recipe"] == r["recipe"] and all(run[k] == base[k] == r[k] for k in ("bits", "group_size", "seqlen"))
                     and run["seed"] == base["seed"]]
            if pairs:
                r["vs_baseline"] = {t: spread([run[t] / base[t] for run, base in pairs]) for t in texts}
    sym = "sym" if args.sym else "asym"
    print(f"\nSmolLM2-135M · calibration C4 (windows × seqlen per row) · WikiText-2 test (no blank lines)"
          f"{''.join(', ' + k for k in others)}, first {args.eval_tokens} tokens each, eval seqlen {eval_seqlen} · "
          f"median [min–max] over seeds · {sym}")
    heads = ["WikiText-2", *others]
    ratio_heads = "".join(f" ÷ {args.baseline}, {h} |" for h in heads) if args.baseline else ""
    print(f"| recipe | bits | group | calibration | seeds | {' | '.join(heads)} |{ratio_heads} quantize s | peak RSS MiB |\n"
          f"|---|---|---|---|---|{'---|' * len(texts) * (2 if args.baseline else 1)}---|---|")
    print(f"| FP32 | 32 | – | – | – | {fp:.2f} |" + "".join(f" {fp_others[k]:.2f} |" if k in fp_others else " – |"
                                                          for k in others) + " – |" * len(ratio_heads and texts)
          + " – | – |")
    for r in rows:
        group = "channel" if r["group_size"] == -1 else r["group_size"]
        ppl = " | ".join(f"{r[t]['median']:.1f} [{r[t]['min']:.1f}–{r[t]['max']:.1f}]" for t in texts)
        if args.baseline:
            vs = r.get("vs_baseline")
            ppl += "".join(f" | {vs[t]['median']:.3f} [{vs[t]['min']:.3f}–{vs[t]['max']:.3f}]" if vs else " | –"
                           for t in texts)
        print(f"| {r['recipe']} | {r['bits']} | {group} | {r['nsamples']}×{r['seqlen']} | "
              f"{','.join(map(str, r['seeds']))} | {ppl} | {r['seconds']} | {r['peak_rss_mib']} |")
    print(f"\nwrote {save(args.name, {'args': vars(args), 'fp_ppl': fp, 'fp_ppl_also': fp_others, 'runs': runs, 'rows': rows})}")


if __name__ == "__main__":
    main()
