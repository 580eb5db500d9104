"""The export's README.md: a Hugging Face model card (YAML front matter, recipe, quality, usage)."""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.moe import coverage_table
from quantkit.recipe import Recipe

MODEL = "path/to/this-model"  # placeholder in the snippets: the export folder or its Hub repo id

# What transformers needs beside itself to load each format (see VERIFIED_WITH in each format module).
EXTRA_PACKAGES = {
    "gptq": ("optimum gptqmodel", "GPTQ needs `optimum` and `gptqmodel` (its CPU/GPU kernels)."),
    "compressed-tensors": (
        "compressed-tensors",
        "pack-quantized needs `compressed-tensors` (≥ 0.18 for 3-bit: older versions misread its dense packing).",
    ),
    "awq": ("gptqmodel", "AWQ needs `gptqmodel` (transformers ≥ 5 uses its AWQ kernels; older transformers used `autoawq`)."),
}

IMPORTANCE_NAMES = {"attncon": "attention-concentration", "actnorm": "activation-norm", "first-last": "first/last-token"}


def _is_hub_id(source: str) -> bool:
    """'org/name' that is not a local folder: the only kind of base_model the Hub accepts."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def _front_matter(recipe: Recipe, source: str) -> list[str]:
    fmt = recipe.export_format
    lines = ["---"]
    if _is_hub_id(source):
        lines += [f"base_model: {source}", "base_model_relation: quantized"]
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
    packages, package_note = EXTRA_PACKAGES[fmt]
    scheme = f"{recipe.bits}-bit, group size {recipe.group_size}, {'symmetric' if recipe.sym else 'asymmetric'}"
    if recipe.needs_calibration and recipe.importance != "uniform":
        scheme += f", {IMPORTANCE_NAMES[recipe.importance]} token importance"
    lines = _front_matter(recipe, source) + [
        "",
        f"# {Path(source).name or 'Model'} — {recipe.bits}-bit {fmt}",
        "",
        f"`{source}` quantized by quantkit {manifest.get('quantkit_version', '')} with {recipe.method.upper()}"
        f"{' + AWQ' if recipe.awq else ''} ({scheme}{', Hadamard-rotated' if recipe.rotate else ''}), stored in the **{fmt}** format "
        f"(`quant_method: {config.get('quantization_config', {}).get('quant_method', fmt)}` in config.json).",
        "",
        "## Recipe",
        "",
        *_table(recipe.to_dict()),
    ]
    if manifest.get("metrics"):
        lines += ["", "## Measured quality", "", *_table(manifest["metrics"])]
    if manifest.get("experts"):
        lines += ["", "## Expert calibration coverage", "",
                  "Calibration tokens the router sent to each routed expert. An expert that received fewer than "
                  f"{next(iter(manifest['experts'].values()))['min_tokens']} was calibrated on all of its layer's tokens "
                  "(all-experts fallback: statistics ignore the routing, the layer's output does not). "
                  "The routers (and the shared-expert gates) are not quantized.", "",
                  *coverage_table(manifest["experts"])]
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
