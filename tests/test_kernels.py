"""Triton dequant-GEMM (quantkit.kernels) vs the torch reference, run on CPU under the Triton interpreter."""

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

import pytest
import torch

import quantkit.kernels.dispatch as kernels
from quantkit.kernels import dequant_gemm
from quantkit.formats.packing import dequantize, pack_cols, pack_rows, unpack_cols, unpack_rows

if not dequant_gemm.INTERPRET:  # defined earlier in this session without the interpreter
    dequant_gemm = importlib.reload(dequant_gemm)

TOL = {torch.float16: 2e-3, torch.float32: 2e-3, torch.bfloat16: 1e-2}  # relative to |x| @ |W^T|
PATHS = ["skinny", "tiled", "dense"]
GROUPS = [32, 64, 128, -1]


def make_layer(k: int, n: int, bits: int, group: int, sym: bool, act_order: bool, seed: int = 0) -> dict:
    """Random packed layer: kwargs of quant_matmul minus x and bias."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group == -1 else group
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    zeros = torch.full((k // g, n), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (k // g, n), generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.005).half()
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return dict(qweight=pack_rows(codes, bits), qzeros=pack_cols(zeros, bits), scales=scales,
                g_idx=g_idx.int(), bits=bits, group_size=group)


def check(path: str, m: int, n: int, k: int, bits: int, group: int, sym: bool = False, act_order: bool = True,
          dtype: torch.dtype = torch.float16, bias: bool = True, lead: tuple = (),
          default_g_idx: bool = False) -> None:
    layer = make_layer(k, n, bits, group, sym, act_order)
    x = torch.randn(*lead, m, k).to(dtype)
    b = torch.randn(n).half() if bias else None
    w = dequantize(unpack_rows(layer["qweight"], bits), layer["scales"].float(),
                   unpack_cols(layer["qzeros"], bits), layer["g_idx"])  # W^T [K, N]
    ref = x.float() @ w + (b.float() if bias else 0.0)
    bound = x.float().abs() @ w.abs()
    if default_g_idx:  # quant_matmul builds k // group_size itself
        layer["g_idx"] = None
    y = dequant_gemm.quant_matmul(x, **layer, bias=b, path=path)
    assert y.dtype == dtype and y.shape == (*lead, m, n)
    err = ((y.float() - ref).abs() / (bound + 1e-3)).max().item()
    assert err <= TOL[dtype], f"max error {err:.2e} relative to |x| @ |W^T|"


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("path", PATHS)
def test_bits_groups_asym_act_order(path, bits, group):
    check(path, 5 if path == "skinny" else 40, 96, 256, bits, group)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("path", PATHS)
def test_sym_default_g_idx(path, bits):
    check(path, 7 if path == "skinny" else 33, 160, 128, bits, 64, sym=True, act_order=False, bias=False,
          default_g_idx=True)


@pytest.mark.parametrize("m,n,k,bits,group", [
    (1, 32, 32, 3, -1), (3, 160, 96, 4, 32), (16, 96, 192, 2, 64), (17, 224, 128, 3, 128),
    (33, 256, 224, 8, 32), (50, 96, 256, 4, -1),
])
@pytest.mark.parametrize("path", ["skinny", "tiled"])
def test_ragged_shapes(path, m, n, k, bits, group):
    check(path, m, n, k, bits, group)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS)
def test_activation_dtypes(path, dtype, bits):
    check(path, 4 if path == "skinny" else 36, 96, 128, bits, 32, dtype=dtype)


@pytest.mark.parametrize("m", [3, 24])
def test_auto_path_and_leading_dims(m):
    check("auto", m, 96, 64, 4, 32, lead=(2,))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_packed(bits):
    layer = make_layer(128, 96, bits, 32, sym=False, act_order=True)
    ref = dequantize(unpack_rows(layer["qweight"], bits), layer["scales"].float(),
                     unpack_cols(layer["qzeros"], bits), layer["g_idx"])
    w = dequant_gemm.dequantize_packed(layer["qweight"], layer["qzeros"], layer["scales"], layer["g_idx"], bits,
                                       dtype=torch.float32)
    torch.testing.assert_close(w, ref, rtol=0, atol=0)


def test_pick_path():
    assert dequant_gemm.pick_path(1) == dequant_gemm.pick_path(dequant_gemm.SKINNY_MAX_M) == "skinny"
    assert dequant_gemm.pick_path(dequant_gemm.SKINNY_MAX_M + 1) == "tiled"
    assert dequant_gemm.pick_path(dequant_gemm.DENSE_FROM_M - 1) == "tiled"
    assert dequant_gemm.pick_path(dequant_gemm.DENSE_FROM_M) == "dense"


def test_use_triton_dispatch(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("QUANTKIT_KERNELS", raising=False)
    assert kernels.use_triton(cuda) and not kernels.use_triton(cpu)
    monkeypatch.setenv("QUANTKIT_KERNELS", "torch")
    assert not kernels.use_triton(cuda) and not kernels.use_triton(cpu)
    monkeypatch.setenv("QUANTKIT_KERNELS", "triton")
    assert kernels.use_triton(cpu)  # the interpreter, for tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels.use_triton(cuda) and not kernels.use_triton(cpu)
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert not kernels.use_triton(cuda)


def test_quantlinear_dispatch(monkeypatch):
    from quantkit.runtime import QuantLinear
    layer = make_layer(128, 96, 3, 32, sym=False, act_order=True)
    lin = QuantLinear(128, 96, bits=3, group_size=32, bias=True)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        setattr(lin, name, layer[name])
    lin.bias.data.normal_()
    calls = []
    real = dequant_gemm.quant_matmul
    monkeypatch.setattr(dequant_gemm, "quant_matmul", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    x = torch.randn(2, 5, 128, dtype=torch.float16)
    monkeypatch.setenv("QUANTKIT_KERNELS", "torch")
    y_torch = lin(x)
    assert not calls
    monkeypatch.setenv("QUANTKIT_KERNELS", "triton")
    y_triton = lin(x)
    assert calls == [x.shape]
    torch.testing.assert_close(y_triton, y_torch, rtol=2e-3, atol=2e-3)
