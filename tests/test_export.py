"""Export → load → the same logits as the in-memory model holding the same quantized weights."""

import json

import pytest
import torch

from quantkit.quantize import run
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
