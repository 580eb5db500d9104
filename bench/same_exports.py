"""Are two versions of quantkit's exports byte for byte the same? (refactors must not change them)

Installs each source tree (non-editable, into WORK/site-<side>) and runs the real CLI from each on
the same checkpoints and calibration text, then compares every exported file with ``cmp`` semantics
(quantkit.json: as JSON, listing the keys whose values differ) and ``quantkit eval`` on each export.

    python bench/same_exports.py --base /tmp/base [--current .] [--work /tmp/same-exports] [--smollm] [--only gguf]

``resume-*`` recipes interrupt the run after RESUME_AFTER layers and finish it with ``--resume``.
Every export is made into a fresh folder (no ``--force``). Make the base tree with ``git archive <commit> | tar -x -C /tmp/base``. Checkpoints: tiny random
Llama, Qwen2 and Mixtral (with a trained BPE tokenizer, from the base tree's tests/conftest.py and
quantkit/testmodel.py), and SmolLM2-135M with ``--smollm``. Exit status 1 if anything differs.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

TINY = ["--calibration", "{calib}", "--nsamples", "8", "--seqlen", "64"]
SMOL = ["--calibration", "c4", "--nsamples", "4", "--seqlen", "128"]
RECIPES = {  # name -> extra quantize flags
    "default": [],
    "rsq": ["--preset", "rsq"],
    "rtn": ["--method", "rtn"],
    "gptq-asym-ct": ["--bits", "3", "--asym", "--format", "compressed-tensors"],
    "awq": ["--format", "awq", "--asym"],
    "gptq-fmt": ["--preset", "gptq", "--format", "gptq"],
    "gguf-q4_0": ["--gguf-type", "Q4_0"],
    "gguf-q4_k": ["--gguf-type", "Q4_K"],
    "rtn-clip": ["--method", "rtn", "--clip-search", "--bits", "3"],
    # interrupted after layer 1 is written (Ctrl-C), then --resume: the resumed walk reads layer 0 back from its part
    "resume-default": [],
    "resume-rsq": ["--preset", "rsq"],
    "resume-gguf-q4_k": ["--gguf-type", "Q4_K"],
}
RESUME_AFTER = 1  # layers written before the interrupt
INTERRUPT = """from quantkit.threads import apply_thread_policy
apply_thread_policy()
from quantkit.cli import main
from quantkit.export import Exporter
real = Exporter.add_layer
def interrupt(self, index, *args):
    if index == {after}:
        raise KeyboardInterrupt
    return real(self, index, *args)
Exporter.add_layer = interrupt
main()
"""
MODELS = {  # name -> recipes to run on it
    "llama": list(RECIPES),
    "qwen2": ["default", "rsq", "rtn", "gptq-asym-ct"],
    "mixtral": ["default", "gptq-asym-ct", "resume-default"],
    "smollm2": ["default", "rsq", "rtn", "gptq-asym-ct", "awq", "gguf-q4_k"],
}


def install(tree: Path, site: Path) -> None:
    if not site.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                        "--no-build-isolation", "--target", str(site), str(tree)], check=True)


def make_models(base: Path, work: Path, smollm: bool) -> dict[str, Path]:
    spec = importlib.util.spec_from_file_location("base_conftest", base / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    sys.path.insert(0, str(work / "site-base"))
    from quantkit.testmodel import make_tiny_moe, prepare

    models = work / "models"
    made = {}
    for name in ("llama", "qwen2"):
        made[name] = models / name
        if not (made[name] / "config.json").exists():
            conftest.make_tiny_model(made[name], name)
    made["mixtral"] = models / "mixtral"
    if not (made["mixtral"] / "config.json").exists():
        make_tiny_moe(made["mixtral"], "mixtral", conftest.make_tokenizer(models / "tokenizer"))
    calib = work / "calib.txt"
    if not calib.exists():
        calib.write_text(conftest.make_text(4000, seed=2))
    if smollm:
        made["smollm2"] = prepare("smollm2-135m")
    return made


def cli(work: Path, side: str, args: list[str], interrupt: bool = False) -> subprocess.CompletedProcess:
    """``quantkit ARGS`` from one side's install (``interrupt``: Ctrl-C once RESUME_AFTER layers are written)."""
    env = {**os.environ, "PYTHONPATH": str(work / f"site-{side}"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = ["-c", INTERRUPT.format(after=RESUME_AFTER)] if interrupt else ["-m", "quantkit"]
    return subprocess.run([sys.executable, *command, *args], cwd=work, env=env, capture_output=True, text=True)


def quantize(work: Path, side: str, source: Path, out: Path, flags: list[str], resume: bool) -> subprocess.CompletedProcess:
    """A fresh export of ``source`` into ``out`` (with ``resume``: interrupted first, then resumed)."""
    subprocess.run(["rm", "-rf", str(out), str(out.parent / f".{out.name}.partial")], check=True)
    args = ["quantize", str(source), str(out), "--json", *flags]
    if resume:
        first = cli(work, side, args, interrupt=True)
        if first.returncode != 1 or "--resume" not in first.stderr:
            return subprocess.CompletedProcess(first.args, 3, first.stdout, f"the interrupt did not stop the run: {first.stderr}")
        args.append("--resume")
    return cli(work, side, args)


def json_diff(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in json_diff(a.get(k), b.get(k), f"{path}.{k}")]
    return [] if a == b else [path or "."]


def compare(one: Path, two: Path) -> list[str]:
    """Differences between export folders ``one`` and ``two``: one line per differing file."""
    files = sorted({p.relative_to(one) for p in one.rglob("*") if p.is_file()} |
                   {p.relative_to(two) for p in two.rglob("*") if p.is_file()})
    out = []
    for rel in files:
        a, b = one / rel, two / rel
        if not (a.exists() and b.exists()):
            out.append(f"{rel}: only in {'base' if a.exists() else 'current'}")
        elif rel.name == "quantkit.json":
            keys = json_diff(json.loads(a.read_text()), json.loads(b.read_text()))
            if keys:
                out.append(f"{rel}: keys differ: {', '.join(keys)}")
        elif not filecmp.cmp(a, b, shallow=False):
            out.append(f"{rel}: bytes differ")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="source tree of the reference version")
    ap.add_argument("--current", type=Path, default=Path("."), help="source tree of the version under test")
    ap.add_argument("--work", type=Path, default=Path("/tmp/same-exports"))
    ap.add_argument("--smollm", action="store_true", help="also SmolLM2-135M (slower)")
    ap.add_argument("--only", default="", help="run only cases whose 'model/recipe' contains this")
    ap.add_argument("--ignore-json", default=".seconds,.created,.versions,.timings",
                    help="quantkit.json key prefixes allowed to differ (comma-separated)")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    site_current = work / "site-current"
    if site_current.exists():  # the tree under test changes between runs: reinstall it
        subprocess.run(["rm", "-rf", str(site_current)], check=True)
    install(args.base.resolve(), work / "site-base")
    install(args.current.resolve(), site_current)
    models = make_models(args.base.resolve(), work, args.smollm)
    ignored = tuple(k for k in args.ignore_json.split(",") if k)
    failed = 0
    for model, recipes in MODELS.items():
        if model not in models:
            continue
        for recipe in recipes:
            case = f"{model}/{recipe}"
            if args.only not in case:
                continue
            flags = [f.format(calib=work / "calib.txt") for f in (SMOL if model == "smollm2" else TINY)] + RECIPES[recipe]
            outs, evals, problems = {}, {}, []
            for side in ("base", "current"):
                out = work / "exports" / side / model / recipe
                run = quantize(work, side, models[model], out, flags, recipe.startswith("resume-"))
                if run.returncode != 0:
                    problems.append(f"{side} quantize failed ({run.returncode}): {run.stderr.strip().splitlines()[-1:]}")
                    continue
                outs[side] = out
                ev = cli(work, side, ["eval", str(out), "--dataset", str(work / "calib.txt"), "--max-tokens", "2048",
                                      "--seqlen", "64", "--json"])
                evals[side] = json.loads(ev.stdout)["perplexity"] if ev.returncode == 0 else f"eval failed: {ev.stderr[-200:]}"
            notes = []
            if len(outs) == 2:
                for d in compare(outs["base"], outs["current"]):
                    keys = d.split(": ", 2)[2].split(", ") if d.startswith("quantkit.json: keys") else None
                    (notes if keys and all(k.startswith(ignored) for k in keys) else problems).append(d)
                if evals["base"] != evals["current"]:
                    problems.append(f"eval perplexity base {evals['base']} vs current {evals['current']}")
            status = "same" if not problems else "DIFFERENT"
            failed += bool(problems)
            print(f"{case:28s} {status}  ppl {evals.get('base')} / {evals.get('current')}", flush=True)
            for p in problems:
                print(f"    {p}", flush=True)
            for n in notes:
                print(f"    (allowed) {n}", flush=True)
    print(f"{failed} case(s) differ" if failed else "all cases identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
