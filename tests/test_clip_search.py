"""MSE clip search of the grid (the reference GPTQ quantizer's mse option, RSQ's --w_clip)."""

import json

import pytest
import torch
from click.testing import CliRunner

from quantkit.algos.gptq import gptq_solve
from quantkit.algos.quantizer import Grid, round_to_nearest
from quantkit.cli import cli


def heavy_tailed(rows=48, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g).pow(4).mul(6).add(0.5)


def row_error(grid, w, scale, zero, norm=2.4):
    return (grid.fake_quantize(w, scale, zero) - w).abs().pow(norm).sum(1)


@pytest.mark.parametrize("sym", [True, False])
def test_search_picks_the_best_of_the_authors_candidates(sym):
    grid, w = Grid(3, -1, sym), heavy_tailed()
    scale, zero = grid.search(w)
    plain = row_error(grid, w, *grid.fit(w))
    found = row_error(grid, w, scale, zero)
    assert (found <= plain).all() and (found < 0.9 * plain).sum() > len(w) // 4  # heavy tails: most rows clip
    for row in range(0, len(w), 7):  # one row at a time against every shrink 1, 0.99, …, 0.21
        errors = [row_error(grid, w[row : row + 1], *grid.fit(w[row : row + 1], 1 - i / 100)).item() for i in range(80)]
        assert found[row].item() == pytest.approx(min(errors), rel=1e-6)
    assert (scale <= grid.fit(w)[0]).all()


def test_rtn_and_gptq_fit_groups_with_the_search():
    grid, w = Grid(3, 32, False), heavy_tailed(seed=1)
    q = round_to_nearest(w, grid, clip_search=True)
    blocks = w.reshape(-1, 32)
    scale, zero = grid.search(blocks)
    assert torch.equal(q.scales.reshape(-1), scale) and torch.equal(q.zeros.reshape(-1), zero)
    assert not torch.equal(q.scales, round_to_nearest(w, grid).scales)
    # per-channel GPTQ without act-order fits each row's grid once, on the original weights
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    H = x.t() @ x / 128
    channel = Grid(3, -1, True)
    searched = gptq_solve(w, H, channel, clip_search=True).weight
    assert torch.equal(searched.scales[:, 0], channel.search(w)[0])
    assert torch.equal(gptq_solve(w, H, channel).weight.scales[:, 0], channel.fit(w)[0])
    # with act-order's static groups too
    static = gptq_solve(w, H, grid, act_order=True, clip_search=True).weight
    assert torch.equal(static.scales.reshape(-1), scale)


def test_rsq_paper_preset_end_to_end(tiny_llama, calib_text, tmp_path):
    out = tmp_path / "q"
    r = CliRunner().invoke(cli, ["quantize", str(tiny_llama), str(out), "--preset", "rsq-paper", "--calibration",
                                 str(calib_text), "--nsamples", "2", "--seqlen", "128", "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    recipe = json.loads((out / "quantkit.json").read_text())["recipe"]
    assert {k: recipe[k] for k in ("bits", "group_size", "sym", "act_order", "clip_search", "rotate", "importance",
                                   "importance_map", "awq")} == {
        "bits": 3, "group_size": -1, "sym": True, "act_order": False, "clip_search": True, "rotate": True,
        "importance": "attncon", "importance_map": "length-invariant", "awq": False}
    card = (out / "README.md").read_text()
    assert "length-invariant floor 0.16 at 128-token windows, 0.005 at 4096" in card and "MSE-searched ranges" in card
    r = CliRunner().invoke(cli, ["quantize", str(tiny_llama), str(tmp_path / "x"), "--importance", "actnorm",
                                 "--importance-map", "length-invariant", "--calibration", str(calib_text)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines()[-1].startswith("Error: --importance-map length-invariant is for --importance attncon")
