"""Data-parallel calibration: torchrun with 2 gloo processes on CPU gives the single-process export."""

import os
import subprocess
import sys

from tests_support import export_files

# Both runs use one intra-op thread per process (torchrun's default): float32 matmuls may split
# their sums differently with other thread counts, and the comparison is byte for byte.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SINGLE = [sys.executable, "-m", "quantkit", "quantize"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "quantkit", "quantize"]


def recipe(calib) -> list[str]:
    # 80 windows of 128 tokens = 3 forward batches of 32/32/16: rank 0 takes two, rank 1 one
    return ["--calibration", str(calib), "--nsamples", "80", "--seqlen", "128", "--bits", "3", "--group-size", "32",
            "--asym", "--rotate", "--importance", "attncon", "--awq", "--awq-clip", "--quiet"]


def test_two_processes_give_the_single_process_export(tiny_llama, calib_text, tmp_path):
    subprocess.run(SINGLE + [str(tiny_llama), str(tmp_path / "single")] + recipe(calib_text), env=ENV, check=True,
                   capture_output=True)
    r = subprocess.run(TORCHRUN + [str(tiny_llama), str(tmp_path / "dp")] + recipe(calib_text), env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 data-parallel processes" in r.stderr
    assert r.stdout.count("wrote") == 1, "only rank 0 reports"
    assert export_files(tmp_path / "dp") == export_files(tmp_path / "single")


def test_more_processes_than_batches_is_refused(tiny_llama, calib_text, tmp_path):
    args = ["--calibration", str(calib_text), "--nsamples", "4", "--seqlen", "64", "--quiet"]
    r = subprocess.run(TORCHRUN + [str(tiny_llama), str(tmp_path / "out")] + args, env=ENV, capture_output=True, text=True)
    assert r.returncode != 0
    assert "fewer than the 2 data-parallel processes: raise --nsamples" in r.stderr
    assert not (tmp_path / "out").exists()
