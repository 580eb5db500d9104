"""The export's model card (README.md) and the verified-loaders entry of its manifest."""

import json

import pytest
import yaml  # a transformers dependency
from click.testing import CliRunner

from quantkit.cli import cli
from quantkit.formats import FORMATS
from quantkit.export.card import model_card
from quantkit.recipe import Recipe


def front_matter(card: str) -> dict:
    """The YAML between the leading '---' lines, parsed; the card must start with it."""
    head, sep, rest = card.partition("\n---\n")
    assert head.startswith("---\n") and sep and rest.strip(), "no front matter block at the top"
    return yaml.safe_load(head[len("---\n"):])


@pytest.mark.parametrize("fmt, needs", [("gptq", "optimum gptqmodel"), ("compressed-tensors", "compressed-tensors"),
                                        ("awq", "gptqmodel")])
def test_card_has_front_matter_recipe_metrics_and_snippets(fmt, needs):
    recipe = Recipe(bits=4, group_size=32, sym=fmt != "awq", format=fmt)
    manifest = {"quantkit_version": "0.1.0", "source_model": "HuggingFaceTB/SmolLM2-135M",
                "metrics": {"wikitext2_perplexity": 21.5}, "verified_with": FORMATS[fmt].VERIFIED_WITH}
    config = {"quantization_config": FORMATS[fmt].quantization_config(recipe)}
    card = model_card(config, recipe, manifest)
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["library_name"] == "transformers"
    assert {"quantized", fmt, "quantkit", "4-bit"} <= set(meta["tags"])
    assert "| group_size | 32 |" in card and "| wikitext2_perplexity | 21.5 |" in card
    assert "with GPTQ + AWQ (4-bit, group size 32" in card and "attention-concentration token importance" in card
    assert "vllm serve " in card and "LLM(model=" in card
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this-model", device_map="auto")' in card
    assert f"pip install transformers accelerate {needs}" in card
    for loader, claim in FORMATS[fmt].VERIFIED_WITH.items():
        assert f"**{loader}**" in card and all(f"{p} {v}" in card for p, v in claim["packages"].items())


def test_export_writes_card_and_verified_loaders(tiny_llama, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(tiny_llama), str(out), "--bits", "3", "--group-size", "32", "--asym",
                                 "--method", "rtn", "--quiet"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["format"] == "compressed-tensors"
    assert manifest["verified_with"] == FORMATS["compressed-tensors"].VERIFIED_WITH
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert "with RTN (3-bit" in card and "token importance" not in card and "AWQ" not in card
    assert "base_model" not in meta  # a local folder is not a Hub id
    assert {"quantized", "compressed-tensors", "quantkit", "3-bit"} <= set(meta["tags"])


def test_card_names_importance_only_where_calibration_used_it():
    def card(**recipe):
        r = Recipe(bits=4, group_size=32, sym=False, **recipe)
        return model_card({"quantization_config": FORMATS[r.export_format].quantization_config(r)}, r, {})

    assert "attention-concentration token importance" in card(method="rtn", awq=True, importance="attncon")
    assert "token importance" not in card(method="rtn", importance="attncon")  # RTN alone reads no activations
    assert "activation-norm token importance" in card(importance="actnorm")
    assert "token importance" not in card(importance="uniform")
