"""The command line end to end on a tiny random Llama, and one clear line for each bad input."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: ")
    for needle in needles:
        assert needle in message, message


def transformers_perplexity(model, tokenizer, text: Path, tokens: int, seqlen: int) -> float:
    """exp(mean NLL) of the first ``tokens`` tokens of ``text`` in windows of ``seqlen``, from
    transformers' own shifted-label loss (each window's mean over seqlen − 1 predictions)."""
    import math

    import torch

    ids = torch.tensor(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"][:tokens]).reshape(-1, seqlen)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids]
    return math.exp(sum(losses) / len(losses))


def test_quantize_eval_inspect(tiny_llama, calib_text, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.runtime import load_quantized

    out = tmp_path / "q"
    r = invoke("quantize", tiny_llama, out, "--calibration", calib_text, "--nsamples", 4, "--seqlen", 64,
               "--bits", 4, "--group-size", 64, "--json", "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["output"] == str(out) and summary["bits"] == 4 and summary["group_size"] == 64
    assert summary["seconds"] > 0 and summary["format"] == "gptq"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ppl = {}
    for label, model in (("fp", tiny_llama), ("quantized", out)):
        r = invoke("eval", model, "--dataset", calib_text, "--seqlen", 64, "--max-tokens", 640, "--json")
        assert r.exit_code == 0, r.output
        result = json.loads(r.stdout)
        assert result["tokens"] == 640 and result["seqlen"] == 64
        ppl[label] = result["perplexity"]
    # the same numbers from transformers' loss: on the FP model, and on the export as our runtime loads it
    fp = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert ppl["fp"] == pytest.approx(transformers_perplexity(fp, tokenizer, calib_text, 640, 64), rel=1e-5)
    quantized = load_quantized(out, dtype=torch.float32)
    assert ppl["quantized"] == pytest.approx(transformers_perplexity(quantized, tokenizer, calib_text, 640, 64), rel=1e-5)
    assert abs(ppl["quantized"] - ppl["fp"]) > 1e-4 * ppl["fp"]  # eval read the quantized weights, not the FP ones
    r = invoke("inspect", out)
    assert r.exit_code == 0 and "gptq" in r.stdout and "MiB" in r.stdout
    r = invoke("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    config = json.loads((out / "config.json").read_text())
    manifest = json.loads((out / "quantkit.json").read_text())
    assert info == {
        "export": str(out),
        "quantization_config": config["quantization_config"],
        "recipe": manifest["recipe"],
        "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
        "source_bytes": manifest["source_bytes"],
        "calibration": manifest["calibration"],
        "metrics": manifest.get("metrics", {}),
        "timings": manifest.get("timings", {}),
    }
    assert info["recipe"]["bits"] == 4 and info["recipe"]["group_size"] == 64
    assert info["quantization_config"]["quant_method"] == "gptq" and info["quantization_config"]["bits"] == 4
    assert info["calibration"]["tokens"] == 4 * 64 and 0 < info["bytes"] < info["source_bytes"]


def test_auto_format_says_which_and_why(tiny_llama, tmp_path):
    r = invoke("quantize", tiny_llama, tmp_path / "q", "--method", "rtn", "--bits", 3, "--asym", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "compressed-tensors"
    assert "--format auto chose compressed-tensors: GPTQ v1 cannot carry" in r.stderr
    assert "(compressed-tensors >= 0.18: dense 3-bit packing)" in r.stderr


def test_existing_output_needs_force(tiny_llama, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert_user_error(invoke("quantize", tiny_llama, out, "--method", "rtn"), "exists", "--force")
    assert (out / "keep.txt").exists()
    # --force replaces only an empty folder or an earlier quantkit export
    assert_user_error(invoke("quantize", tiny_llama, out, "--method", "rtn", "--force"), "--force replaces only", "keep.txt")
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    for _ in range(2):  # the empty folder, then the export written into it
        r = invoke("quantize", tiny_llama, out, "--method", "rtn", "--force", "--quiet")
        assert r.exit_code == 0 and (out / "model.safetensors").exists()


def test_missing_model_path(tmp_path):
    assert_user_error(invoke("quantize", tmp_path / "nope", tmp_path / "out"), "does not exist")


def test_folder_without_weights(tiny_llama, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_llama / "config.json", model)
    assert_user_error(invoke("quantize", model, tmp_path / "out"), "no weights")


def test_pickle_only_checkpoint_needs_allow_pickle(tiny_llama, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_llama / "config.json", model)
    (model / "pytorch_model.bin").write_bytes(b"not really")
    assert_user_error(invoke("quantize", model, tmp_path / "out"), "pickle", "--allow-pickle")


def test_unsupported_architecture(tmp_path):
    from tests_support import save_gpt2

    model = save_gpt2(tmp_path / "gpt2")
    assert_user_error(invoke("quantize", model, tmp_path / "out", "--method", "rtn"), "unsupported architecture 'gpt2'")


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_bits_not_supported(tiny_llama, tmp_path, bits):
    assert_user_error(invoke("quantize", tiny_llama, tmp_path / "out", "--bits", bits), f"--bits {bits}", "2, 3, 4, 8")


def test_group_size_must_divide(tiny_llama, tmp_path):
    r = invoke("quantize", tiny_llama, tmp_path / "out", "--method", "rtn", "--group-size", 96)
    assert_user_error(r, "--group-size 96", "layer 0 self_attn.q_proj", "valid sizes")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "content,needle",
    [(b"", "holds no text"), (b"   \n\n", "holds no text"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa", "not UTF-8"),
     (b"just a few words", "fewer than one window")],
    ids=["empty", "blank", "binary", "not-utf8", "too-short"],
)
def test_bad_calibration_file(tiny_llama, tmp_path, content, needle):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(content)
    r = invoke("quantize", tiny_llama, tmp_path / "out", "--calibration", calib, "--seqlen", 64, "--nsamples", 2)
    assert_user_error(r, needle)
    assert not (tmp_path / "out").exists()


def test_jsonl_calibration(tiny_llama, calib_text, tmp_path):
    lines = calib_text.read_text().splitlines()
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": line}) for line in lines) + "\n")
    r = invoke("quantize", tiny_llama, tmp_path / "out", "--calibration", calib, "--nsamples", 2, "--seqlen", 32, "--quiet")
    assert r.exit_code == 0, r.output
    calib.write_text('{"content": "no text field"}\n')
    assert_user_error(invoke("quantize", tiny_llama, tmp_path / "o2", "--calibration", calib), "no string 'text'")


def test_named_set_offline_is_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    r = invoke("quantize", tiny_llama, tmp_path / "out", "--calibration", "c4-hub")
    assert_user_error(r, "named set 'c4-hub'", "local text file")


def test_eval_text_shorter_than_a_window(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("the city")
    assert_user_error(invoke("eval", tiny_llama, "--dataset", text, "--seqlen", 64), "fewer than one window")


def test_awq_and_attncon_are_on_with_gptq_and_off_with_rtn_unless_asked():
    from quantkit.recipe import PRESETS, Recipe

    default = Recipe()
    assert (default.awq, default.importance) == (True, "attncon")
    assert default.to_dict()["awq"] is True and default.to_dict()["importance"] == "attncon"  # the manifest records them
    assert (Recipe(method="rtn").awq, Recipe(method="rtn").importance) == (False, "uniform")
    assert Recipe(method="rtn", awq=True, importance="attncon").awq is True
    assert Recipe(method="gptq", importance="uniform").importance == "uniform"
    assert (Recipe.from_dict(PRESETS["gptq"]).awq, Recipe.from_dict(PRESETS["gptq"]).importance) == (False, "uniform")
    assert Recipe.from_dict({**PRESETS["rsq"], "awq": True}).awq is True
