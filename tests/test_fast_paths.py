"""The speed paths against what they replaced: exports byte-identical on a tiny Llama, SmolLM2's
first q/k/v stack solved bit for bit."""

import pytest
import torch

import quantkit.algos.gptq
import quantkit.methods.solvers
from quantkit.algos.gptq import GPTQResult
from quantkit.algos.quantizer import QuantizedWeight
from quantkit.job import run
from quantkit.recipe import Recipe
from test_gptq import reference_gptq
from tests_support import export_files


def reference_solver(w, H, grid, block_size, damp, act_order, clip_search=False):
    assert not clip_search  # the paper's loop fits min–max ranges
    codes, scales, zeros, loss = reference_gptq(w, H, grid, block_size, damp, act_order)
    width = grid.width(w.shape[1])
    g_idx = (torch.arange(w.shape[1]) // width).int()
    return GPTQResult(QuantizedWeight(codes, scales, zeros, g_idx, grid.bits, width), loss, damp)


@pytest.mark.parametrize("extra", [
    dict(bits=4, group_size=32, sym=True, importance="uniform", awq=False),
    dict(bits=3, group_size=32, sym=False),  # the default recipe: attncon importance and AWQ
])
def test_fast_paths_leave_the_export_byte_identical(tiny_llama, calib_text, tmp_path, monkeypatch, extra):
    """Quantized with today's solver and Hessian, then with the paper's GPTQ loop and a full xᵀx:
    every file the same."""
    recipe = Recipe(nsamples=8, seqlen=64, **extra)
    run(str(tiny_llama), tmp_path / "fast", recipe, calibration=str(calib_text), show_progress=False)

    monkeypatch.setattr(quantkit.methods.solvers, "gptq_solve", reference_solver)
    monkeypatch.setattr(quantkit.algos.gptq, "gram", lambda x: x.t() @ x)
    run(str(tiny_llama), tmp_path / "reference", recipe, calibration=str(calib_text), show_progress=False)
    assert export_files(tmp_path / "fast") == export_files(tmp_path / "reference")


class _Enough(Exception):
    pass


@pytest.mark.slow
def test_solver_matches_the_reference_on_smollm2s_first_stack(smollm2, shared_data, monkeypatch):
    """Layer 0's q/k/v stack of SmolLM2 under the default recipe (real weights, AWQ-scaled, real
    attncon-weighted Hessian): the solver's codes, scales and zeros are the reference loop's."""
    seen = {}

    def grab(w, H, grid, block_size, damp, act_order, clip_search=False):
        assert not clip_search  # the default recipe fits min–max ranges, as the reference does
        seen.update(w=w.clone(), H=H.clone(), grid=grid, act_order=act_order)
        raise _Enough

    monkeypatch.setattr(quantkit.methods.solvers, "gptq_solve", grab)
    recipe = Recipe(bits=3, group_size=64, sym=False, nsamples=8, seqlen=256)
    with pytest.raises(_Enough):
        run(str(smollm2), None, recipe, calibration=str(shared_data / "c4-sample.txt"), show_progress=False)
    w, H, grid = seen["w"], seen["H"], seen["grid"]
    assert w.shape == (960, 576)
    fast = quantkit.algos.gptq.gptq_solve(w, H, grid, act_order=seen["act_order"])
    codes, scales, zeros, _ = reference_gptq(w, H, grid, act_order=seen["act_order"])
    assert torch.equal(fast.weight.codes.float(), codes)
    assert torch.equal(fast.weight.scales, scales) and torch.equal(fast.weight.zeros, zeros)
