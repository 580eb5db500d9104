"""The export's README.md: a Hugging Face model card (YAML front matter, recipe, quality, usage)."""

from __future__ import annotations

import json
from pathlib import Path

from quantkit import methods
from quantkit.calibration import NAMED_SETS
from quantkit.algos.importance import REFERENCE_LENGTH, length_invariant_floor
from quantkit.formats import FORMATS
from quantkit.preflight import is_hub_id
from quantkit.moe import coverage_table
from quantkit.recipe import Recipe

MODEL = "path/to/this-model"  # placeholder in the snippets: the export folder or its Hub repo id



def base_model(manifest: dict, source: str) -> str | None:
    """The hub id the export derives from: the source when it is one, else the manifest's ``base_model``."""
    return source if is_hub_id(source) else manifest.get("base_model")


def recipe_label(recipe: Recipe) -> str:
    """The recipe in one line, every choice that changes the weights: 'GPTQ + AWQ, attention-concentration
    importance [0.005, 1], W4 g64 sym'."""
    method = methods.label("solver", recipe.method) + (" + AWQ" if recipe.awq else "") + (" + Hadamard rotation" if recipe.rotate else "")
    parts = [method]
    if recipe.needs_calibration and recipe.importance != "uniform":
        parts.append(f"{methods.label('importance', recipe.importance)} importance [{recipe.importance_min:g}, {recipe.importance_max:g}]")
    group = "per-channel" if recipe.group_size == -1 else f"g{recipe.group_size}"
    parts.append(f"W{recipe.bits} {group} {'sym' if recipe.sym else 'asym'}")
    return ", ".join(parts)


def recipe_steps(recipe: Recipe) -> list[str]:
    """What runs on each decoder layer, in order, as the progress header names it."""
    steps = ["Hadamard rotation (R1, R2)"] if recipe.rotate else []
    if recipe.needs_calibration and recipe.importance != "uniform":
        steps.append(f"{methods.label('importance', recipe.importance)} token importance "
                     f"[{recipe.importance_min:g}, {recipe.importance_max:g}]")
    if recipe.awq:
        steps.append("AWQ scales" + " + duo" * recipe.awq_duo + " + clip" * recipe.awq_clip)
    solver = methods.get("solver", recipe.method)
    damped = f" ({'act-order, ' if recipe.act_order else ''}damp {recipe.damp:g})" if "damp" in solver.settings else ""
    steps.append(solver.label + damped)
    return steps + [f"export {recipe.export_format}"]


def used_settings(recipe: Recipe) -> dict:
    """The recipe fields that took part in this recipe (RTN has no damping, calibration or act-order)."""
    r = recipe.to_dict()
    keys = ["bits", "group_size", "sym", "method"]
    keys += methods.get("solver", recipe.method).settings
    if recipe.needs_calibration:
        keys += ["nsamples", "seqlen", "seed", "expand", "importance"]
        if recipe.importance != "uniform":
            keys += ["importance_min", "importance_max"]
    if recipe.rotate:
        keys += ["rotate", "rotation_seed"]
    if recipe.awq:
        keys += ["awq", "awq_duo", "awq_clip"]
    return {**{k: r[k] for k in keys}, "format": recipe.export_format}


def add_metrics(folder: Path, recipe: Recipe, metrics: dict) -> dict:
    """Record measured ``metrics`` in an export's quantkit.json and model card; returns the manifest."""
    manifest = json.loads((folder / "quantkit.json").read_text())
    manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
    config = json.loads((folder / "config.json").read_text())
    (folder / "quantkit.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(config, recipe, manifest))
    return manifest


def _front_matter(recipe: Recipe, source: str, manifest: dict) -> list[str]:
    fmt = recipe.export_format
    lines = ["---"]
    hub_id = base_model(manifest, source)
    if hub_id:
        lines += [f"base_model: {hub_id}", "base_model_relation: quantized"]
    lines += ["library_name: transformers", "tags:"]
    lines += [f"  - {tag}" for tag in ("quantized", fmt, "quantkit", f"{recipe.bits}-bit")]
    return lines + ["---"]


def _table(rows: dict) -> list[str]:
    lines = ["| | |", "| --- | --- |"]
    for key, value in rows.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        lines.append(f"| {key} | {shown} |")
    return lines


def model_card(config: dict, recipe: Recipe, manifest: dict) -> str:
    """README.md text for an export: ``config`` is its config.json (with quantization_config),
    ``manifest`` its quantkit.json (source_model, optional metrics and verified_with)."""
    fmt = recipe.export_format
    source = manifest.get("source_model") or config.get("_name_or_path", "")
    name = base_model(manifest, source) or Path(source).name or "Model"  # never an absolute local path
    packages, package_note = FORMATS[fmt].TRANSFORMERS_NEEDS
    group = "per output channel" if recipe.group_size == -1 else f"group size {recipe.group_size}"
    scheme = f"{recipe.bits}-bit, {group}, {'symmetric' if recipe.sym else 'asymmetric'}"
    if recipe.needs_calibration and recipe.importance != "uniform":
        scheme += f", {methods.label('importance', recipe.importance)} token importance"
        if recipe.importance_map == "length-invariant":
            floor = length_invariant_floor(recipe.importance_min, recipe.importance_max, recipe.seqlen)
            scheme += (f" (length-invariant floor {floor:.3g} at {recipe.seqlen}-token windows, "
                       f"{recipe.importance_min:g} at {REFERENCE_LENGTH})")
        else:
            scheme += f" (fixed range [{recipe.importance_min:g}, {recipe.importance_max:g}])"
    lines = _front_matter(recipe, source, manifest) + [
        "",
        f"# {name.split('/')[-1]} — {recipe.bits}-bit {fmt}",
        "",
        f"`{name}` quantized by quantkit {manifest.get('quantkit_version', '')} with {methods.label('solver', recipe.method)}"
        f"{' + AWQ' if recipe.awq else ''} ({scheme}{', Hadamard-rotated' if recipe.rotate else ''}{', MSE-searched ranges' if recipe.clip_search else ''}), stored in the **{fmt}** format "
        f"(`quant_method: {config.get('quantization_config', {}).get('quant_method', fmt)}` in config.json).",
        "",
        "## Recipe",
        "",
        *_table(used_settings(recipe)),
    ]
    calibration = manifest.get("calibration")
    if calibration:
        source_name = calibration["source"] if calibration["source"] in NAMED_SETS else Path(calibration["source"]).name
        lines += ["", f"Calibrated on `{source_name}`{' (chat template)' if calibration.get('chat_template') else ''}: "
                      f"{calibration['tokens']} tokens in windows drawn from {calibration['text_tokens']} tokens of text "
                      f"(windows SHA-256 `{calibration['sha256'][:16]}…`)."]
    metrics = manifest.get("metrics")
    if metrics:
        lines += ["", "## Measured quality", "", *_table(metrics)]
    if manifest.get("experts"):
        lines += ["", "## Expert calibration coverage", "",
                  "Calibration tokens the router sent to each routed expert. An expert that received fewer than "
                  f"{next(iter(manifest['experts'].values()))['min_tokens']} was calibrated on all of its layer's tokens "
                  "(all-experts fallback: statistics ignore the routing, the layer's output does not). "
                  "The routers (and the shared-expert gates) are not quantized.", "",
                  *coverage_table(manifest["experts"])]
    dataset = (metrics or {}).get("eval_dataset", "wiki")
    dataset = dataset if dataset in NAMED_SETS else Path(dataset).name
    seqlen = (metrics or {}).get("eval_seqlen", 2048)
    lines += [
        "",
        "## Use",
        "",
        f"Replace `{MODEL}` with this folder or the Hub repo you upload it to.",
        "",
        "vLLM (reads the quantization from config.json; not run by quantkit's tests, and which bit widths",
        "its kernels accept depends on the vLLM version and GPU):",
        "",
        "```bash",
        f"vllm serve {MODEL}",
        "```",
        "",
        "```python",
        "from vllm import LLM",
        "",
        f'llm = LLM(model="{MODEL}")',
        'print(llm.generate("The capital of France is")[0].outputs[0].text)',
        "```",
        "",
        f"transformers — {package_note}",
        "",
        "```bash",
        f"pip install transformers accelerate {packages}",
        "```",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{MODEL}", device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{MODEL}")',
        'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
        "",
        "Measure its perplexity with quantkit (`wiki`, `c4`, ... are named text sets; any UTF-8 file works):",
        "",
        "```bash",
        f"quantkit eval {MODEL} --dataset {dataset} --seqlen {seqlen}",
        "```",
    ]
    if fmt == "gptq" and not recipe.sym:
        lines += ["", "`GPTQModel.load` refuses asymmetric GPTQ checkpoints that gptqmodel did not write; "
                      "load this one through transformers as above."]
    verified = manifest.get("verified_with", {})
    if verified:
        lines += ["", "## Verified loaders", "",
                  "quantkit's interop tests load this format with (CPU, weights and logits compared):", ""]
        for loader, claim in verified.items():
            versions = ", ".join(f"{p} {v}" for p, v in claim["packages"].items())
            lines.append(f"- **{loader}** ({versions}): {claim['notes']}")
    return "\n".join(lines) + "\n"
