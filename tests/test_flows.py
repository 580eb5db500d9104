"""Everyday flows on a tiny random Llama: default calibration, recipe files that reproduce an
export, chat calibration, progress and summary, inspect, resume/restart, the model card."""

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from quantkit.cli import cli
from tests_support import export_files

SMALL = ("--nsamples", 2, "--seqlen", 32)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def manifest(folder):
    return json.loads((folder / "quantkit.json").read_text())


def test_quantize_without_calibration_uses_c4(offline_text, tiny_llama, tmp_path):
    r = ok(invoke("quantize", tiny_llama, tmp_path / "q", *SMALL, "--quiet"))
    assert r.stderr.count("no --calibration given: calibrating on the offline set 'c4'") == 1
    calibration = manifest(tmp_path / "q")["calibration"]
    assert calibration["source"] == "c4" and calibration["tokens"] == 64 and calibration["text_tokens"] > 100_000
    assert len(calibration["sha256"]) == 64
    r = ok(invoke("quantize", tiny_llama, tmp_path / "rtn", "--method", "rtn", "--quiet"))
    assert "--calibration given" not in r.stderr and "calibration" not in manifest(tmp_path / "rtn")  # RTN reads no text


def test_default_group_size_fits_the_model(tiny_llama, tmp_path):
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "m96", hidden=96)  # in-features 96 and 192: 32 is the largest that fits
    r = ok(invoke("quantize", model, tmp_path / "q", "--method", "rtn", "--quiet", "--json"))
    assert json.loads(r.stdout)["group_size"] == 32
    assert "--group-size not given: using 32, the largest of 128/64/32 that divides every quantized layer's in-features (96, 192)" in r.stderr
    r = ok(invoke("quantize", tiny_llama, tmp_path / "q2", "--method", "rtn", "--group-size", 64, "--quiet", "--json"))
    assert json.loads(r.stdout)["group_size"] == 64 and "--group-size not given" not in r.stderr


def test_recipe_file_and_manifest_reproduce_an_export(tiny_llama, calib_text, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"bits": 3, "group-size": 32, "sym": False, "nsamples": 3, "seqlen": 32,
                                      "seed": 7, "calibration": str(calib_text)}))
    ok(invoke("quantize", tiny_llama, tmp_path / "a", "--recipe", recipe, "--quiet"))
    first = manifest(tmp_path / "a")
    assert first["recipe"]["bits"] == 3 and first["recipe"]["group_size"] == 32 and first["recipe"]["sym"] is False
    assert first["recipe"]["seed"] == 7 and first["calibration"]["source"] == str(calib_text)
    ok(invoke("quantize", tiny_llama, tmp_path / "b", "--recipe", tmp_path / "a" / "quantkit.json", "--quiet"))
    assert export_files(tmp_path / "a") == export_files(tmp_path / "b")  # byte-equal but for the run's timings
    ok(invoke("quantize", tiny_llama, tmp_path / "c", "--recipe", tmp_path / "a" / "quantkit.json", "--seed", 8, "--quiet"))
    assert manifest(tmp_path / "c")["recipe"]["seed"] == 8  # flags override the file
    assert export_files(tmp_path / "a")["model.safetensors"] != export_files(tmp_path / "c")["model.safetensors"]


@pytest.mark.parametrize("content, needle", [
    ("bits: [4\n", "does not parse"), ("bitz: 4\n", "unknown key(s) bitz"), ("- 4\n", "must hold a mapping"),
], ids=["syntax", "unknown-key", "not-a-mapping"])
def test_bad_recipe_file(tiny_llama, tmp_path, content, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(content)
    r = invoke("quantize", tiny_llama, tmp_path / "q", "--recipe", recipe)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert needle in r.stderr.strip().splitlines()[-1]


TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def test_chat_calibration_renders_the_template(tiny_llama, calib_text, tmp_path):
    model = tmp_path / "chat-model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    lines = calib_text.read_text().splitlines()
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": lines[i]},
                                                      {"role": "assistant", "content": lines[i + 1]}]}) + "\n"
                             for i in range(0, 200, 2)))
    from quantkit.calibration import read_chats, render_chats
    from quantkit.model import load_tokenizer

    rendered = render_chats(read_chats(chats), load_tokenizer(str(model)))
    assert rendered.startswith(f"<|user|>{lines[0]}</s><|assistant|>{lines[1]}</s>")
    ok(invoke("quantize", model, tmp_path / "q", "--calibration", chats, "--chat-template", *SMALL, "--quiet"))
    assert manifest(tmp_path / "q")["calibration"]["chat_template"] is True
    assert "(chat template)" in (tmp_path / "q" / "README.md").read_text()
    r = invoke("quantize", model, tmp_path / "q2", "--calibration", chats, *SMALL)
    assert r.exit_code == 1 and "has 'messages', pass --chat-template" in r.stderr
    r = invoke("quantize", tiny_llama, tmp_path / "q3", "--calibration", chats, "--chat-template", *SMALL)
    assert r.exit_code == 1 and "tokenizer has no chat template" in r.stderr.strip().splitlines()[-1]


def test_progress_one_line_per_layer_and_summary(tiny_llama, calib_text, tmp_path):
    r = ok(invoke("quantize", tiny_llama, tmp_path / "q", "--calibration", calib_text, *SMALL))
    err = r.stderr
    assert "steps per layer (2 layers): attention-concentration token importance [0.005, 1] → AWQ scales → " \
           "GPTQ (act-order, damp 0.01) → export gptq" in err
    layer_lines = [line for line in err.splitlines() if line.startswith("layer ")]
    assert [line.split()[1] for line in layer_lines] == ["1/2", "2/2"]  # one line per layer, 1-based
    assert all("GPTQ loss Σ" in line for line in layer_lines) and "self_attn.q_proj" not in err
    assert "done in " in err and "peak memory" in err and " MiB → " in err and f"model card {tmp_path / 'q' / 'README.md'}" in err
    assert r.stdout.splitlines()[-1].startswith(f"next: quantkit eval {tmp_path / 'q'}")
    r = ok(invoke("quantize", tiny_llama, tmp_path / "v", "--calibration", calib_text, *SMALL, "--verbose"))
    assert "layer 1/2  self_attn.q_proj/k_proj/v_proj" in r.stderr and "layer 2/2  mlp.down_proj" in r.stderr


def test_progress_numbering_is_consistent():
    from quantkit.progress import LayerProgress

    progress = LayerProgress(30, enabled=False)
    progress.stage(2, "awq")
    task = progress.progress.tasks[0]
    assert task.description == "layer 3/30 · awq" and task.completed == 0
    progress.layer_done(2)
    assert progress.progress.tasks[0].completed == 1


def test_eval_shows_window_progress(tiny_llama, calib_text):
    r = ok(invoke("eval", tiny_llama, "--dataset", calib_text, "--seqlen", 64, "--max-tokens", 640))
    assert "evaluating" in r.stderr and "done 10/10" in r.stderr and "running ppl" in r.stderr
    assert r.stdout.startswith("perplexity ")


def test_inspect_table_and_json(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "q"
    ok(invoke("quantize", tiny_llama, out, "--calibration", calib_text, *SMALL, "--bits", 3, "--asym", "--quiet",
              "--eval-dataset", calib_text, "--eval-tokens", 256, "--eval-seqlen", 64))
    info = json.loads(ok(invoke("inspect", out, "--json")).stdout)
    assert info["quantization_config"]["format"] == "pack-quantized" and info["recipe"]["bits"] == 3
    assert info["metrics"]["eval_tokens"] == 256
    evaluated = json.loads(ok(invoke("eval", out, "--dataset", calib_text, "--max-tokens", 256, "--seqlen", 64, "--json")).stdout)
    assert info["metrics"]["perplexity"] == pytest.approx(evaluated["perplexity"], abs=5e-5)  # the export's own eval (4 decimals)
    assert info["calibration"]["tokens"] == 64 and info["bytes"] < info["source_bytes"]
    table = ok(invoke("inspect", out)).stdout
    assert "GPTQ + AWQ, attention-concentration importance [0.005, 1], W3 g128 asym" in table
    assert f"{info['bytes'] / 2**20:.1f} MiB ({info['bytes'] / info['source_bytes']:.1%} of" in table
    assert "eval dataset" in table and str(info["metrics"]["perplexity"]) in table


def test_partial_run_needs_resume_or_restart(tiny_llama, tmp_path):
    out = tmp_path / "q"
    partial = tmp_path / ".q.partial"
    partial.mkdir()
    (partial / "resume.json").write_text(json.dumps({"recipe": {}, "source": str(tiny_llama), "tokens_sha256": "",
                                                     "layers_done": 1, "files": {"part-00000.safetensors": {"size": 1, "sha256": ""}}}))
    r = invoke("quantize", tiny_llama, out, "--method", "rtn")
    assert r.exit_code == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "holds an interrupted run" in line and "1 layers done" in line and "--resume" in line and "--restart" in line
    assert (partial / "resume.json").exists()  # nothing was deleted
    ok(invoke("quantize", tiny_llama, out, "--method", "rtn", "--restart", "--quiet"))
    assert (out / "model.safetensors").exists() and not partial.exists()
    assert invoke("quantize", tiny_llama, tmp_path / "x", "--resume", "--restart").exit_code == 2


def test_small_calibration_warns_and_is_recorded(tiny_llama, tmp_path):
    from conftest import make_text

    calib = tmp_path / "small.txt"
    calib.write_text(make_text(600, seed=3))
    r = ok(invoke("quantize", tiny_llama, tmp_path / "q", "--calibration", calib, *SMALL, "--quiet"))
    assert "GPTQ and AWQ fitted to so little text can do worse than RTN" in r.stderr
    info = manifest(tmp_path / "q")["calibration"]
    card = (tmp_path / "q" / "README.md").read_text()
    assert f"Calibrated on `small.txt`: 64 tokens in windows drawn from {info['text_tokens']} tokens" in card
    assert info["sha256"][:16] in card and str(tmp_path) not in card  # no local paths in a card meant for the Hub


def test_card_lists_only_used_settings_and_measured_metrics(tiny_llama, calib_text, tmp_path):
    ok(invoke("quantize", tiny_llama, tmp_path / "rtn", "--method", "rtn", "--bits", 3, "--asym", "--group-size", 32, "--quiet"))
    card = (tmp_path / "rtn" / "README.md").read_text()
    recipe_table = card.split("## Recipe")[1].split("##")[0]
    for absent in ("nsamples", "act_order", "damp", "importance", "awq", "rotation_seed", "seqlen"):
        assert f"| {absent} |" not in recipe_table, absent
    assert "| bits | 3 |" in recipe_table and "| method | rtn |" in recipe_table
    assert f"`{tiny_llama.name}` quantized by quantkit" in card and str(tiny_llama) not in card
    assert "quantkit eval path/to/this-model --dataset wiki --seqlen 2048" in card
    ok(invoke("quantize", tiny_llama, tmp_path / "g", "--calibration", calib_text, *SMALL, "--quiet",
              "--eval-dataset", calib_text, "--eval-tokens", 256, "--eval-seqlen", 64))
    card = (tmp_path / "g" / "README.md").read_text()
    metrics = manifest(tmp_path / "g")["metrics"]
    assert "## Measured quality" in card and f"| perplexity | {metrics['perplexity']} |" in card
    assert f"| fp_perplexity | {metrics['fp_perplexity']} |" in card
    assert "quantkit eval path/to/this-model --dataset calib.txt --seqlen 64" in card
    for present in ("nsamples", "act_order", "damp", "importance_min", "awq"):
        assert f"| {present} |" in card.split("## Recipe")[1].split("##")[0], present
