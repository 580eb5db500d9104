"""GPU benchmark of quant_matmul on Llama-3-8B linear shapes (needs CUDA).

    python -m quantkit.kernels.bench [--bits 4,3,8] [--json out.json] [--peak-gbps 4800]

For each layer (K -> N), M rows and bits, times every applicable path ("skinny" M ≤ 16, "tiled" M ≥ 16,
"dense" M ≥ 64; * marks the one quant_matmul picks) with CUDA events (median; L2 flushed before each call),
next to torch fp16 F.linear on the dense weight. GB/s counts the packed weight bytes (qweight, qzeros,
scales, g_idx) once per call; err is max |y − y_ref| / max |y_ref| against packing.dequantize + matmul.
Ends with the smallest M where "dense" beats "tiled" (the measured DENSE_FROM_M).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

SHAPES = {"q_o": (4096, 4096), "k_v": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}  # K, N
MS = (1, 4, 16, 64, 256, 1024, 4096)
DEVICE = "cuda"
PEAK_GBPS = [  # first substring of torch.cuda.get_device_name() that matches
    ("GH200", 4000), ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("H800", 3350),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40", 864), ("L4", 300),
    ("A10", 600), ("4090", 1008), ("3090", 936),
]


def time_ms(fn: Callable[[], object], flush: torch.Tensor) -> float:
    """Median ms of fn over ~0.1 s of calls (10 to 200), with the L2 cache flushed before each."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    iters = max(10, min(200, int(100 / max(start.elapsed_time(end), 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for s, e in events:
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def random_layer(k: int, n: int, bits: int, group: int) -> dict:
    """Random packed layer on the GPU: kwargs of quant_matmul minus x (every int32 is a valid code word)."""
    def words(*shape: int) -> torch.Tensor:
        return torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=DEVICE)

    return dict(qweight=words(k * bits // 32, n), qzeros=words(k // group, n * bits // 32),
                scales=torch.rand(k // group, n, dtype=torch.float16, device=DEVICE) * 0.01,
                g_idx=torch.arange(k, dtype=torch.int32, device=DEVICE) // group, bits=bits, group_size=group)


def reference_weight(layer: dict) -> torch.Tensor:
    """Dense fp16 W [N, K] of a packed layer via the torch reference."""
    from quantkit.formats.packing import dequantize, unpack_cols, unpack_rows
    bits = layer["bits"]
    w_t = dequantize(unpack_rows(layer["qweight"], bits), layer["scales"].float(),
                     unpack_cols(layer["qzeros"], bits), layer["g_idx"])
    return w_t.t().contiguous().half()


def run(bits_list: list[int], group: int, peak_gbps: float | None, budget_s: float) -> list[dict]:
    from quantkit.kernels.dequant_gemm import pick_path, quant_matmul
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEVICE)
    t0, rows, fp16_ms = time.perf_counter(), [], {}
    for bits in bits_list:
        for name, (k, n) in SHAPES.items():
            if time.perf_counter() - t0 > budget_s:
                print(f"time budget of {budget_s:.0f} s spent: skipping {name} {bits}-bit", file=sys.stderr)
                continue
            layer = random_layer(k, n, bits, group)
            w = reference_weight(layer)
            weight_bytes = sum(t.numel() * t.element_size() for t in layer.values() if torch.is_tensor(t))
            for m in MS:
                x = torch.randn(m, k, dtype=torch.float16, device=DEVICE)
                y_ref = F.linear(x, w).float()
                if (name, m) not in fp16_ms:
                    fp16_ms[name, m] = time_ms(lambda: F.linear(x, w), flush)
                paths = [p for p, ok in (("skinny", m <= 16), ("tiled", m >= 16), ("dense", m >= 64)) if ok]
                for path in paths:
                    call = lambda: quant_matmul(x, **layer, path=path)  # noqa: E731
                    err = ((call().float() - y_ref).abs().max() / y_ref.abs().max()).item()
                    ms = time_ms(call, flush)
                    rows.append(dict(layer=name, K=k, N=n, M=m, bits=bits, group_size=group, path=path,
                                     auto=path == pick_path(m), ms=ms, weight_gbps=weight_bytes / ms / 1e6,
                                     peak_frac=weight_bytes / ms / 1e6 / peak_gbps if peak_gbps else None,
                                     tflops=2 * m * n * k / ms / 1e9, fp16_ms=fp16_ms[name, m],
                                     speedup_vs_fp16=fp16_ms[name, m] / ms, max_rel_err=err))
    return rows


def crossover(rows: list[dict]) -> dict[str, int | None]:
    """Per layer/bits, the smallest M from which "dense" is at least as fast as "tiled" for every larger M."""
    out = {}
    for key in sorted({(r["layer"], r["bits"]) for r in rows}):
        t = {(r["M"], r["path"]): r["ms"] for r in rows if (r["layer"], r["bits"]) == key}
        ms = sorted(m for m, p in t if p == "dense" and (m, "tiled") in t)
        wins = [m for i, m in enumerate(ms) if all(t[j, "dense"] <= t[j, "tiled"] for j in ms[i:])]
        out[f"{key[0]} {key[1]}-bit"] = wins[0] if wins else None
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'layer':8} {'K':>5} {'N':>5} {'M':>5} {'b':>2} {'path':8} {'ms':>8} {'GB/s':>7} {'%peak':>6} "
          f"{'TFLOP/s':>8} {'fp16 ms':>8} {'speedup':>7} {'err':>8}")
    for r in rows:
        peak = f"{100 * r['peak_frac']:5.1f}%" if r["peak_frac"] else "     -"
        print(f"{r['layer']:8} {r['K']:5} {r['N']:5} {r['M']:5} {r['bits']:2} {r['path'] + '*' * r['auto']:8} "
              f"{r['ms']:8.4f} {r['weight_gbps']:7.0f} {peak} {r['tflops']:8.1f} {r['fp16_ms']:8.4f} "
              f"{r['speedup_vs_fp16']:6.2f}x {r['max_rel_err']:8.1e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,3,8", help="comma-separated bit widths (default 4,3,8)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--peak-gbps", type=float, help="device peak memory bandwidth (default: from a table)")
    ap.add_argument("--budget-s", type=float, default=240, help="stop starting new layers after this long")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("quantkit.kernels.bench needs a CUDA GPU: torch.cuda.is_available() is False")
    device = torch.cuda.get_device_name()
    peak = args.peak_gbps or next((gbps for key, gbps in PEAK_GBPS if key in device), None)
    print(f"{device}, peak {peak or 'unknown (pass --peak-gbps)'} GB/s, group size {args.group_size}")
    rows = run([int(b) for b in args.bits.split(",")], args.group_size, peak, args.budget_s)
    print_table(rows)
    cross = crossover(rows)
    print("dense (dequantize + cuBLAS) beats tiled from M =", cross)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, peak_gbps=peak, crossover_m=cross, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
