"""Export formats: one module per format, each the one home of its packing, reading, config and constraints.

Every format module (``gptq``, ``awq``, ``compressed_tensors``, ``gguf``) holds:
  ``pack_linear(prefix, q, recipe)``  checkpoint tensors of one quantized Linear
  ``read_linear(parts, qc)``          those tensors in the runtime layout of ``quantkit.formats.packing``
                                      (GGUF: ``dequantize_linear``, its blocks have no such layout)
  ``quantization_config(recipe)``     the config.json entry its loaders read
  ``LEAVES`` / ``REQUIRED``           the checkpoint tensors of a Linear, and those it cannot do without
  ``VERIFIED_WITH``                   the loaders the tests prove it with (quantkit.json)
and its constraints (bit widths, zero points, shapes). This module picks the format of a recipe
(``choose``), the grid the solver rounds to (``grid``), and reads a checkpoint's quantized Linears
for both the runtime (``read_linears``) and the exporter's resume (``dense_linears``).
"""

from __future__ import annotations

import torch

from quantkit.algos.quantizer import BlockGrid, Grid
from quantkit.errors import QuantkitError
from quantkit.formats import awq, compressed_tensors, gguf, gptq
from quantkit.formats.packing import dequantize_packed
from quantkit.recipe import Recipe

# recipe format / config quant_method -> its module
FORMATS = {"gptq": gptq, "awq": awq, "compressed-tensors": compressed_tensors, "gguf": gguf}


def choose(recipe: Recipe, moe: bool = False) -> tuple[str, str]:
    """(format, why) of a recipe; for --format auto from what the interop and vLLM tests prove
    (README's serving table): GPTQ v1 where every loader serves it, compressed-tensors for the rest
    and for mixture-of-experts models (``moe``)."""
    if recipe.format != "auto":
        return recipe.format, "chosen with --format"
    if moe:
        return "compressed-tensors", ("a mixture-of-experts model: transformers' GPTQ path replaces nn.Linear modules only, "
                                      "so it leaves fused experts unloaded; compressed-tensors MoE exports load in "
                                      "transformers and vLLM (CompressedTensorsWNA16MoEMethod)")
    if recipe.sym and recipe.bits in gptq.SERVED_BITS:
        where = "CPU and CUDA" if recipe.bits == 4 else "CUDA only: its CPU kernels are 4-bit"
        return "gptq", (f"symmetric {recipe.bits}-bit GPTQ v1 loads in transformers (gptqmodel), GPTQModel and vLLM "
                        f"(AutoGPTQLinearMethod, {where})")
    if recipe.bits == 4:
        return "compressed-tensors", ("GPTQ v1 cannot carry this grid everywhere (vLLM reads GPTQ symmetric only, "
                                      "GPTQModel refuses asymmetric v1); 4-bit compressed-tensors loads in transformers "
                                      "(compressed-tensors 0.17-0.20) and vLLM (CompressedTensorsWNA16)")
    needs = " >= 0.18: dense 3-bit packing" if recipe.bits == 3 else ""
    return "compressed-tensors", (f"GPTQ v1 cannot carry this grid everywhere (vLLM reads GPTQ 4/8-bit symmetric only); "
                                  f"{recipe.bits}-bit compressed-tensors loads in transformers (compressed-tensors{needs}); "
                                  "vLLM accepts it but runs it only on CUDA with its optional humming package")


def grid(recipe: Recipe) -> Grid | BlockGrid:
    """The grid the solver rounds to: one the recipe's format stores exactly (a GGUF type's blocks;
    else bits/group/sym with the format's lowest storable asymmetric zero point)."""
    fmt = FORMATS[recipe.export_format]
    if fmt is gguf:
        return BlockGrid(recipe.gguf_type)
    return Grid(recipe.bits, recipe.group_size, recipe.sym, 0 if recipe.sym else fmt.MIN_ZERO)


def check_packable(where: str, out_features: int, in_features: int, bits: int) -> None:
    """Refuse a Linear W [out, in] whose codes do not fill whole int32 words at ``bits``."""
    if in_features % 32 or (out_features * bits) % 32:
        raise QuantkitError(f"{where} × out_features {out_features} cannot be packed into int32 words at {bits} bits")


def format_of(qc: dict):
    """The module of the format a checkpoint's quantization_config declares."""
    method = qc.get("quant_method")
    if method not in FORMATS:
        raise QuantkitError(f"quantization method {method!r} is not supported by quantkit's loader ({', '.join(FORMATS)})")
    return FORMATS[method]


def config_grid(qc: dict, where) -> tuple[int, int]:
    """(bits, group size; -1 = per output channel) that a checkpoint's quantization_config declares, validated
    (``where``: the export folder, for the message)."""
    fmt = format_of(qc)
    method = qc["quant_method"]
    if fmt is compressed_tensors:
        try:
            scheme = compressed_tensors.weights_scheme(qc)
            bits, group = scheme.get("num_bits"), -1 if scheme.get("strategy") == "channel" else scheme.get("group_size")
        except (AttributeError, KeyError, TypeError):
            raise QuantkitError(f"{where / 'config.json'}: quantization_config.config_groups is malformed: "
                                "the export is damaged, re-export it") from None
        names = ("config_groups.*.weights.num_bits", "config_groups.*.weights.group_size")
    else:
        bits, group = qc.get("bits"), qc.get("group_size")
        names = ("bits", "group_size")
    allowed = fmt.BITS
    if type(bits) is not int or bits not in allowed:
        raise QuantkitError(f"{where / 'config.json'}: quantization_config.{names[0]} is {bits!r}; a {method} export "
                            f"has one of {', '.join(map(str, allowed))}: the export is damaged, re-export it")
    if type(group) is not int or not (group == -1 or group >= 1):
        raise QuantkitError(f"{where / 'config.json'}: quantization_config.{names[1]} is {group!r}; expected -1 "
                            "(per channel) or a positive group size: the export is damaged, re-export it")
    return bits, group


def take_linears(tensors: dict[str, torch.Tensor], qc: dict, where) -> dict[str, dict[str, torch.Tensor]]:
    """{Linear name: {leaf: tensor}} of every quantized Linear in ``tensors`` (checkpoint names),
    popped out of it; a Linear missing one of its format's required tensors is refused."""
    fmt = format_of(qc)
    marker = "." + fmt.LEAVES[0]
    linears = {}
    for name in [n[: -len(marker)] for n in tensors if n.endswith(marker)]:
        parts = {leaf: tensors.pop(f"{name}.{leaf}") for leaf in fmt.LEAVES if f"{name}.{leaf}" in tensors}
        missing = next((leaf for leaf in fmt.REQUIRED if leaf not in parts), None)
        if missing is not None:
            raise QuantkitError(f"'{where}' lacks the tensor {name}.{missing}: the export is incomplete, re-export it")
        linears[name] = parts
    return linears


def read_linears(tensors: dict[str, torch.Tensor], qc: dict, where) -> dict[str, dict[str, torch.Tensor]]:
    """{Linear name: runtime tensors (qweight, qzeros, scales, g_idx; see ``packing``)} of every quantized
    Linear in ``tensors``, converted from the checkpoint's format and popped out of ``tensors``."""
    fmt = format_of(qc)
    layers = {}
    for name, parts in take_linears(tensors, qc, where).items():
        try:
            layers[name] = fmt.read_linear(parts, qc)
        except (ValueError, RuntimeError, IndexError, ZeroDivisionError, TypeError) as e:
            raise QuantkitError(f"'{where}': the quantized tensors of {name} are malformed "
                                f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}): re-export it") from None
    return layers


def dense_linears(tensors: dict[str, torch.Tensor], qc: dict, where) -> dict[str, torch.Tensor]:
    """{Linear name: W [N, K] float32} of every quantized Linear in ``tensors``, dequantized and
    popped out of ``tensors``."""
    if format_of(qc) is gguf:
        return {name: gguf.dequantize_linear(parts, qc) for name, parts in take_linears(tensors, qc, where).items()}
    bits, _ = config_grid(qc, where)
    return {name: dequantize_packed(**parts, bits=bits) for name, parts in read_linears(tensors, qc, where).items()}
