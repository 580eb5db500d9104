"""Export → load → the same logits as the in-memory model holding the same quantized weights."""

import json

import pytest
import torch

from quantkit.job import run
from quantkit.recipe import Recipe
from quantkit.runtime import QuantLinear, load_quantized


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_round_trip(tiny_llama, calib_text, tmp_path, recipe):
    out = tmp_path / "q"
    result = run(str(tiny_llama), out, recipe, calibration=str(calib_text), show_progress=False)
    loaded = load_quantized(out, dtype=torch.float32)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 2 * 7
    # in-memory weights use fp32 scales rounded to fp16, so fp32 inference agrees to rounding
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids), atol=1e-4, rtol=1e-4)
    manifest = json.loads((out / "quantkit.json").read_text())
    assert manifest["recipe"]["bits"] == recipe.bits


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(bits=4, group_size=32, method="gptq", nsamples=4, seqlen=64),
        Recipe(bits=3, group_size=64, sym=False, method="gptq", act_order=True, format="gptq", nsamples=4, seqlen=64),
        Recipe(bits=2, group_size=-1, sym=False, method="rtn", format="gptq"),
        Recipe(bits=8, group_size=128, method="rtn"),
        Recipe(bits=4, group_size=64, rotate=True, importance="attncon", nsamples=4, seqlen=64, expand=2),
        Recipe(bits=3, group_size=32, rotate=True, method="rtn", format="gptq", sym=False),
    ],
    ids=["w4g32-gptq", "w3g64-asym-actorder", "w2-perchannel-rtn", "w8g128-rtn", "w4g64-rsq-expand", "w3-rotated-rtn"],
)
def test_export_loads_back_to_same_logits(tiny_llama, calib_text, tmp_path, recipe):
    check_round_trip(tiny_llama, calib_text, tmp_path, recipe)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["bits"] == recipe.bits
    assert config["group_size"] == recipe.group_size and config["sym"] == recipe.sym
    assert config["desc_act"] is False and config["checkpoint_format"] == "gptq"


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(bits=4, group_size=32, sym=False, method="rtn", awq=True, awq_clip=True, format="awq", nsamples=4, seqlen=64),
        Recipe(bits=4, group_size=64, method="gptq", awq=True, rotate=True, format="awq", nsamples=4, seqlen=64),
    ],
    ids=["rtn-awq-clip", "rsq-awq"],
)
def test_awq_export_loads_back_to_same_logits(tiny_llama, calib_text, tmp_path, recipe):
    check_round_trip(tiny_llama, calib_text, tmp_path, recipe)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "bits": 4, "group_size": recipe.group_size, "zero_point": True,
                      "version": "gemm", "modules_to_not_convert": None}


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(bits=3, group_size=64, sym=False, method="gptq", nsamples=4, seqlen=64),
        Recipe(bits=2, group_size=-1, sym=True, method="rtn", format="compressed-tensors"),
        Recipe(bits=4, group_size=32, sym=False, method="gptq", rotate=True, importance="attncon", nsamples=4, seqlen=64),
    ],
    ids=["w3g64-asym-auto", "w2-perchannel-sym", "w4g32-asym-rsq"],
)
def test_compressed_tensors_export_loads_back_to_same_logits(tiny_llama, calib_text, tmp_path, recipe):
    check_round_trip(tiny_llama, calib_text, tmp_path, recipe)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == recipe.bits and weights["symmetric"] == recipe.sym
    assert weights["strategy"] == ("channel" if recipe.group_size == -1 else "group")


def test_quantized_weights_differ_from_original(tiny_llama, calib_text):
    from quantkit.model import load_model

    original, _, _ = load_model(str(tiny_llama))
    result = run(str(tiny_llama), None, Recipe(bits=2, group_size=32, method="rtn"), show_progress=False)
    w0 = original.model.layers[0].mlp.down_proj.weight
    w1 = result.model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w0, w1)
    assert w1[0, :32].unique().numel() <= 4  # one 2-bit group holds at most 4 levels


def test_sharded_export_has_index(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "sharded"
    run(str(tiny_llama), out, Recipe(bits=4, group_size=32, method="rtn"), max_shard_bytes=100_000, show_progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert not list(tmp_path.glob(".*partial"))
    loaded = load_quantized(out, dtype=torch.float32)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, QuantLinear)


FORMAT_RECIPES = {
    "gptq-sym": Recipe(bits=4, group_size=32, format="gptq"),
    "gptq-asym": Recipe(bits=3, group_size=32, sym=False, format="gptq"),
    "awq": Recipe(bits=4, group_size=32, sym=False, format="awq"),
    "ct-asym": Recipe(bits=2, group_size=64, sym=False, format="compressed-tensors"),
    "ct-perchannel": Recipe(bits=8, group_size=-1, format="compressed-tensors"),
    "gguf-q4_1": Recipe(bits=4, group_size=32, sym=False, format="gguf"),
    "gguf-q6_k": Recipe(bits=6, group_size=16, sym=True, format="gguf", gguf_type="Q6_K"),
}


@pytest.mark.parametrize("recipe", list(FORMAT_RECIPES.values()), ids=list(FORMAT_RECIPES))
def test_exporter_writes_checkpoint_tensors_and_reads_them_back(tmp_path, recipe):
    """The exporter takes checkpoint-named tensors and quantized weights (no modules), writes them under
    the layer's prefix in the format's leaves, and reads back exactly the weights the format stores
    (scales as stored: fp16 for the int32 formats, the block values for GGUF)."""
    from safetensors.torch import load_file

    from quantkit.algos.quantizer import QuantizedWeight, round_to_nearest
    from quantkit.export import Exporter
    from quantkit.formats import FORMATS

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    w[:, :32] = w[:, :32].abs()  # an all-positive group: the asymmetric zero point 0 that GPTQ v1 cannot store
    q = round_to_nearest(w, recipe.grid)
    norm = torch.rand(256, generator=gen)
    exporter = Exporter(tmp_path, recipe, layers_path="model.layers")
    [part] = exporter.add_layer(3, {"input_layernorm.weight": norm}, {"self_attn.q_proj": q})
    fmt = FORMATS[recipe.export_format]
    stored = set(load_file(part))
    leaves = {n.rsplit(".", 1)[1] for n in stored if n.startswith("model.layers.3.self_attn.q_proj.")}
    assert stored == {"model.layers.3.input_layernorm.weight"} | {f"model.layers.3.self_attn.q_proj.{leaf}" for leaf in leaves}
    assert set(fmt.REQUIRED) <= leaves <= set(fmt.LEAVES)
    back = exporter.read_layer(3)
    assert set(back) == {"input_layernorm.weight", "self_attn.q_proj.weight"}
    assert torch.equal(back["input_layernorm.weight"], norm)
    if recipe.export_format != "gguf":
        q = QuantizedWeight(q.codes, q.scales.half().float(), q.zeros, q.g_idx, q.bits, q.group_size, q.offset)
    assert torch.equal(back["self_attn.q_proj.weight"], q.dequantize())


def test_gptq_v1_grid_stores_every_zero_point():
    """GPTQ v1 keeps zero − 1, so its asymmetric grid starts at zero point 1 (MIN_ZERO); the other formats' at 0."""
    from quantkit.algos.quantizer import round_to_nearest
    from quantkit.formats import gptq

    w = torch.rand(8, 32) + 0.5  # all positive: min/max rounding would put the zero point at 0
    assert Recipe(bits=4, group_size=32, sym=False, format="gptq").grid.min_zero == gptq.MIN_ZERO == 1
    assert Recipe(bits=4, group_size=32, sym=False, format="compressed-tensors").grid.min_zero == 0
    q = round_to_nearest(w, Recipe(bits=4, group_size=32, sym=False, format="gptq").grid)
    assert q.zeros.min() == 1
    runtime = gptq.read_linear({k.split(".", 1)[1]: v for k, v in gptq.pack_linear("m", q, None).items()}, {"bits": 4})
    from quantkit.formats.packing import unpack_cols

    assert torch.equal(unpack_cols(runtime["qzeros"], 4), q.zeros.t().to(torch.int32))


@pytest.mark.parametrize("bits, sym, expected, why", [
    (4, True, "gptq", "CPU and CUDA"),
    (8, True, "gptq", "CUDA only"),
    (4, False, "compressed-tensors", "GPTQModel refuses asymmetric v1"),
    (3, True, "compressed-tensors", ">= 0.18: dense 3-bit packing"),
    (2, False, "compressed-tensors", "only on CUDA with its optional humming package"),
])
def test_format_auto_follows_the_serving_table(bits, sym, expected, why):
    from quantkit.formats import choose

    recipe = Recipe(bits=bits, group_size=32, sym=sym)
    fmt, reason = choose(recipe)
    assert (fmt, recipe.export_format) == (expected, expected) and why in reason
    assert choose(Recipe(bits=bits, group_size=32, sym=sym, format="compressed-tensors"))[0] == "compressed-tensors"


def test_gguf_export_lists_its_files_and_force_replaces_it(tiny_llama, tmp_path):
    """Every export's quantkit.json lists its files (the GGUF one too), so --force may replace it."""
    out = tmp_path / "gguf"
    recipe = Recipe(bits=4, group_size=32, method="rtn", format="gguf")
    run(str(tiny_llama), out, recipe, show_progress=False, keep_model=False)
    listed = json.loads((out / "quantkit.json").read_text())["files"]
    assert listed == sorted(f.name for f in out.iterdir() if f.name != "quantkit.json") and "model-Q4_0.gguf" in listed
    run(str(tiny_llama), out, recipe, show_progress=False, keep_model=False, force=True)
    assert (out / "model-Q4_0.gguf").is_file()
