"""Bit packing round trips and the GPTQ checkpoint layout."""

import pytest
import torch

from quantkit.algos.quantizer import Grid, round_to_nearest
from quantkit.errors import QuantkitError
from quantkit.formats import gptq
from quantkit.recipe import Recipe
from quantkit.formats.packing import pack_awq, pack_cols, pack_rows, unpack_awq, unpack_cols, unpack_rows
from quantkit.runtime import QuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_rows_and_cols_round_trip(bits):
    codes = torch.randint(0, 2**bits, (96, 64))
    packed = pack_rows(codes, bits)
    assert packed.shape == (96 * bits // 32, 64) and packed.dtype == torch.int32
    assert torch.equal(unpack_rows(packed, bits), codes.int())
    assert torch.equal(unpack_cols(pack_cols(codes.t(), bits), bits), codes.t().int())


def test_4bit_words_hold_consecutive_rows_lsb_first():
    codes = torch.arange(8).reshape(8, 1).repeat(4, 1)  # rows 0..7 repeated
    assert pack_rows(codes, 4)[0, 0].item() == 0x76543210


def test_3bit_packs_32_codes_in_3_words_with_straddling():
    codes = torch.zeros(32, 1, dtype=torch.long)
    codes[10] = 0b111  # bits 30..32: straddles words 0 and 1
    w = pack_rows(codes, 3)[:, 0].tolist()
    assert w[0] & 0xFFFFFFFF == 0b11 << 30 and w[1] == 0b1 and w[2] == 0


def test_awq_round_trip_and_order():
    codes = torch.randint(0, 16, (4, 32))
    assert torch.equal(unpack_awq(pack_awq(codes)), codes.int())
    ordered = torch.arange(8).reshape(1, 8)
    assert pack_awq(ordered)[0, 0].item() == 0x75316420


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_gptq_layout_round_trip_through_quantlinear(bits, sym, group_size):
    torch.manual_seed(bits)
    w = torch.randn(64, 128)
    recipe = Recipe(bits=bits, group_size=group_size, sym=sym, format="gptq")
    q = round_to_nearest(w, recipe.grid)  # the grid a gptq export is solved on (asymmetric zero points ≥ 1)
    tensors = gptq.pack_linear("m", q, recipe)
    k, n = 128, 64
    g = 1 if group_size == -1 else k // group_size
    assert tensors["m.qweight"].shape == (k * bits // 32, n)
    assert tensors["m.qzeros"].shape == (g, n * bits // 32)
    assert tensors["m.scales"].shape == (g, n) and tensors["m.scales"].dtype == torch.float16
    runtime = gptq.read_linear({k_.split(".")[1]: v for k_, v in tensors.items()}, {"bits": bits})
    layer = QuantLinear(k, n, bits, group_size, bias=False)
    for name, t in runtime.items():
        setattr(layer, name, t)
    expected = q.scales.half().float()[:, q.g_idx.long()] * (q.codes - q.zeros[:, q.g_idx.long()])
    assert torch.equal(layer.dequantize_weight(), expected)


def test_gptq_v1_refuses_zero_point_zero():
    w = torch.rand(32, 32)  # all positive: asymmetric zero point 0
    q = round_to_nearest(w, Grid(4, 32, sym=False))  # a compressed-tensors grid: zero points from 0
    assert (q.zeros == 0).any()
    with pytest.raises(QuantkitError) as refused:
        gptq.pack_linear("model.layers.0.mlp.up_proj", q, Recipe(sym=False, format="gptq"))
    assert str(refused.value) == ("model.layers.0.mlp.up_proj: an asymmetric zero point of 0 cannot be stored in GPTQ v1 "
                                  "(it keeps zero − 1); use --format compressed-tensors or --sym")
    recipe = Recipe(sym=False, group_size=32, format="gptq")  # the grid a gptq export solves on lifts those zero points to 1
    q = round_to_nearest(w, recipe.grid)
    assert q.zeros.min() == 1
    assert unpack_cols(gptq.pack_linear("m", q, recipe)["m.qzeros"], 4).min() == 0  # stored as zero − 1


def test_gptq_reader_undoes_word_level_borrow():
    """GPTQModel stores zero − 1 by subtracting 0x11111111 from whole words: a zero of 0 borrows."""
    zeros = torch.tensor([[0, 3, 0, 15, 1, 0, 7, 2]]).t().contiguous().t()  # one group, 8 columns
    true_words = pack_cols(zeros, 4).to(torch.int64) & 0xFFFFFFFF
    stored = (true_words - 0x11111111) % 2**32
    stored = torch.where(stored >= 2**31, stored - 2**32, stored).to(torch.int32)
    qweight = pack_rows(torch.zeros(32, 8, dtype=torch.long), 4)
    runtime = gptq.read_linear({"qweight": qweight, "qzeros": stored, "scales": torch.ones(1, 8).half(),
                                "g_idx": torch.zeros(32, dtype=torch.int32)}, {"bits": 4})
    assert torch.equal(unpack_cols(runtime["qzeros"], 4), zeros.int())
