"""Scale and reliability: bounded host memory, resume after SIGKILL, determinism, safe failures."""

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import make_tiny_model
from tests_support import export_files
from quantkit.cli import cli

QUANTIZE = [sys.executable, "-m", "quantkit.cli", "quantize"]


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("deep") / "m", layers=8, hidden=256)


def recipe_args(calib: Path) -> list[str]:
    return ["--calibration", str(calib), "--nsamples", "8", "--seqlen", "128", "--bits", "3", "--group-size", "64",
            "--asym", "--act-order", "--quiet"]


def test_resume_after_sigkill_is_byte_identical(deep_model, calib_text, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run(QUANTIZE + [str(deep_model), str(whole)] + recipe_args(calib_text), check=True, capture_output=True)

    proc = subprocess.Popen(QUANTIZE + [str(deep_model), str(resumed)] + recipe_args(calib_text),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".resumed.partial" / "resume.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["layers_done"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(state.read_text())["layers_done"]
    assert 2 <= done < 8 and not resumed.exists(), "the run must be killed midway"

    other = recipe_args(calib_text)
    other[other.index("--bits") + 1] = "4"
    r = CliRunner().invoke(cli, ["quantize", str(deep_model), str(resumed), "--resume"] + other)
    assert r.exit_code == 1 and "different recipe" in r.stderr and "bits" in r.stderr
    assert state.is_file(), "a refused resume keeps the interrupted work"

    subprocess.run(QUANTIZE + [str(deep_model), str(resumed), "--resume"] + recipe_args(calib_text), check=True,
                   capture_output=True)
    assert export_files(resumed) == export_files(whole)


def test_same_recipe_and_seed_give_identical_exports(tiny_llama, calib_text, tmp_path):
    args = ["--calibration", str(calib_text), "--nsamples", "4", "--seqlen", "64", "--rotate", "--importance", "attncon",
            "--awq", "--quiet"]
    for out in ("a", "b"):
        r = CliRunner().invoke(cli, ["quantize", str(tiny_llama), str(tmp_path / out)] + args)
        assert r.exit_code == 0, r.output
    assert export_files(tmp_path / "a") == export_files(tmp_path / "b")


# Linux keeps ru_maxrss across fork and exec, so a child forked from this (large) test process
# would report at least our own RSS: a small Python launches the command and reports its peak.
MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
sys.stderr.write(proc.stderr.read().decode()[-2000:])
print(usage.ru_maxrss * 1024)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss(cmd: list[str]) -> int:
    r = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_peak_rss_does_not_grow_with_layers(tmp_path):
    layer_bytes = None
    rss = {}
    for layers in (4, 16):
        model = make_tiny_model(tmp_path / f"m{layers}", layers=layers, hidden=512, intermediate_size=2048,
                                num_attention_heads=8, num_key_value_heads=8)
        per_layer = (4 * 512 * 512 + 3 * 512 * 2048) * 4
        layer_bytes = per_layer
        rss[layers] = peak_rss(QUANTIZE + [str(model), str(tmp_path / f"q{layers}"), "--method", "rtn", "--bits", "4",
                                           "--max-shard-size", "8", "--quiet"])
    growth = rss[16] - rss[4]
    print(f"peak RSS 4 layers {rss[4] / 2**20:.0f} MiB, 16 layers {rss[16] / 2**20:.0f} MiB, "
          f"one layer {layer_bytes / 2**20:.0f} MiB")
    # without streaming the 12 extra layers alone would add 12 × 12 MiB
    assert growth < 0.25 * layer_bytes + 16 * 2**20


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_nan_weights_name_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_tiny_model(tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    r = invoke("quantize", model, tmp_path / "out", "--method", "rtn")
    assert r.exit_code == 1 and "NaN or Inf in the weights of layer 1 (mlp.up_proj.weight)" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_cholesky_failure_names_layer_and_suggests_damp(tiny_llama, calib_text, tmp_path, monkeypatch):
    def never_positive_definite(A, upper=False):
        return torch.zeros_like(A), torch.tensor(1)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", never_positive_definite)
    r = invoke("quantize", tiny_llama, tmp_path / "out", "--calibration", calib_text, "--nsamples", 2, "--seqlen", 32)
    assert r.exit_code == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "layer 0 self_attn.q_proj" in line and "--damp" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_disk_full_leaves_no_output(tiny_llama, tmp_path, monkeypatch):
    import quantkit.export.writer as writer

    calls = {"n": 0}
    real = writer.save_file

    def fill_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "save_file", fill_disk)
    r = invoke("quantize", tiny_llama, tmp_path / "out", "--method", "rtn")
    assert r.exit_code == 1 and "No space left on device" in r.stderr and "free disk space" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_ctrl_c_keeps_work_for_resume(tiny_llama, calib_text, tmp_path, monkeypatch):
    from quantkit.export import Exporter

    real = Exporter.add_layer

    def interrupt_second_layer(self, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        return real(self, index, *args)

    monkeypatch.setattr(Exporter, "add_layer", interrupt_second_layer)
    args = ["quantize", tiny_llama, tmp_path / "out", "--calibration", calib_text, "--nsamples", 2, "--seqlen", 32]
    r = invoke(*args)
    assert r.exit_code == 1 and "--resume" in r.stderr and "interrupted after 1 layers" in r.stderr
    assert (tmp_path / ".out.partial" / "resume.json").is_file() and not (tmp_path / "out").exists()
    monkeypatch.setattr(Exporter, "add_layer", real)
    r = invoke(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / ".out.partial").exists()


def test_resume_without_interrupted_run(tiny_llama, tmp_path):
    r = invoke("quantize", tiny_llama, tmp_path / "out", "--method", "rtn", "--resume")
    assert r.exit_code == 1 and "nothing to resume" in r.stderr


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama stored in float16 (the walk computes in float32, the export keeps float16)."""
    from safetensors.torch import load_file, save_file

    model = make_tiny_model(tmp_path_factory.mktemp("fp16") / "m", layers=4, hidden=64)
    weights = {k: v.half() for k, v in load_file(model / "model.safetensors").items()}
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["dtype"] = "float16"
    (model / "config.json").write_text(json.dumps(config))
    return model


RECIPE_FAMILIES = {
    "rtn": ["--method", "rtn"],
    "gptq": ["--preset", "gptq"],
    "gptq-awq-attncon": ["--method", "gptq", "--sym", "--format", "gptq"],  # the default recipe
    "rsq-rotate": ["--preset", "rsq"],
}


@pytest.mark.parametrize("family", list(RECIPE_FAMILIES))
def test_resume_is_byte_identical_for_every_recipe(family, fp16_model, calib_text, tmp_path, monkeypatch):
    """Interrupted after 2 of 4 layers and resumed: the same bytes as an uninterrupted run (the walk
    propagates with the exported float16 values, which is what a resumed walk reads back)."""
    from quantkit.export import Exporter

    args = RECIPE_FAMILIES[family] + ["--bits", "4", "--group-size", "32", "--calibration", calib_text,
                                      "--nsamples", "4", "--seqlen", "64", "--quiet"]
    r = invoke("quantize", fp16_model, tmp_path / "whole", *args)
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    assert load_file(tmp_path / "whole" / "model.safetensors")["model.layers.3.input_layernorm.weight"].dtype == torch.float16
    real = Exporter.add_layer

    def interrupt(self, index, *rest):
        if index == 2:
            raise KeyboardInterrupt
        return real(self, index, *rest)

    monkeypatch.setattr(Exporter, "add_layer", interrupt)
    r = invoke("quantize", fp16_model, tmp_path / "resumed", *args)
    assert r.exit_code == 1 and "interrupted after 2 layers" in r.stderr
    monkeypatch.setattr(Exporter, "add_layer", real)
    r = invoke("quantize", fp16_model, tmp_path / "resumed", "--resume", *args)
    assert r.exit_code == 0 and "resuming after 2 finished layers" in r.stderr, r.output
    assert export_files(tmp_path / "resumed") == export_files(tmp_path / "whole")
