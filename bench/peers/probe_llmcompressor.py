#!/usr/bin/env python
"""Probe llm-compressor / compressed-tensors "pack-quantized" checkpoints on CPU.

Run inside the llmcompressor venv (bench/peers/make_venvs.sh):

  PY=~/.cache/quantkit-peers/llmcompressor/bin/python
  $PY bench/peers/make_tiny_llama.py /tmp/tiny
  $PY bench/peers/probe_llmcompressor.py quantize --model /tmp/tiny --out /tmp/ct4 --bits 4 --group-size 32
  $PY bench/peers/probe_llmcompressor.py inspect --ckpt /tmp/ct4
  $PY bench/peers/probe_llmcompressor.py load --ckpt /tmp/ct4 --dtypes float16,bfloat16,float32
  $PY bench/peers/probe_llmcompressor.py foreign --model /tmp/tiny --out /tmp/ct-foreign --bits 4 --group-size 32 [--asym] [--g-idx perm]
  $PY bench/peers/probe_llmcompressor.py all --model /tmp/tiny --out /tmp/ct4 [quantize args]

Each subcommand prints one JSON document on stdout (logs go to stderr).

`inspect` decodes weight_packed under two layouts ("stream": dense bit stream,
32 values per `bits` int32 words; "per_word": floor(32/bits) values per word)
and reports which one reproduces the dense weights that compressed-tensors
itself decompresses (`load`). `foreign` writes a pack-quantized checkpoint
with our own packer (peer_formats.pack_stream, RTN quantization, no
compressed-tensors code) and checks that transformers loads it exactly, for a
full and a minimal quantization_config, optionally with weight_g_idx.
"""
import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import peer_formats as pf  # noqa: E402

import torch  # noqa: E402

PROBE_MODULE = "model.layers.0.self_attn.q_proj"
LAYOUTS = ("stream", "per_word")
QSUFFIXES = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_g_idx")


def log(*a):
    print("[probe_llmcompressor]", *a, file=sys.stderr, flush=True)


def versions():
    import importlib.metadata as md
    out = {}
    for p in ("llmcompressor", "compressed-tensors", "transformers", "torch", "safetensors", "accelerate", "datasets"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def tstr(t):
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}


# --------------------------------------------------------------------------- quantize

def weight_args(a):
    w = {"num_bits": a.bits, "type": "int", "symmetric": not a.asym, "strategy": a.strategy}
    if a.strategy == "group":
        w["group_size"] = a.group_size
    if a.actorder != "none":
        w["actorder"] = a.actorder
    return w


def cmd_quantize(a):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    src = a.model
    if a.edge_groups:
        from make_tiny_llama import edge_group_copy
        src = edge_group_copy(a.model, a.out.rstrip("/") + ".src", a.group_size)
    cfg = json.load(open(os.path.join(src, "config.json")))
    g = torch.Generator().manual_seed(a.seed)
    ids = [torch.randint(3, cfg["vocab_size"], (a.seqlen,), generator=g).tolist() for _ in range(a.nsamples)]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * a.seqlen] * a.nsamples})
    recipe_kw = {}
    if a.scheme:
        recipe_kw["scheme"] = a.scheme
        recipe_kw["targets"] = ["Linear"]
    else:
        recipe_kw["config_groups"] = {"group_0": {"targets": ["Linear"], "weights": weight_args(a)}}
    if a.actorder != "none" and a.scheme:
        recipe_kw["actorder"] = a.actorder
    elif a.actorder == "none":
        recipe_kw["actorder"] = None
    recipe = GPTQModifier(ignore=["lm_head"], **recipe_kw)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, a.dtype) if a.dtype != "auto" else "auto")
    t_load = time.time() - t0
    with contextlib.redirect_stdout(sys.stderr):
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=a.nsamples,
                max_seq_length=a.seqlen, shuffle_calibration_samples=False)
        t_q = time.time() - t0 - t_load
        if os.path.exists(a.out):
            shutil.rmtree(a.out)
        model.save_pretrained(a.out, save_compressed=True)
    return {"cmd": "quantize", "versions": versions(), "src": src, "out": os.path.abspath(a.out),
            "model_dtype": str(model.dtype), "recipe": recipe_kw, "nsamples": a.nsamples, "seqlen": a.seqlen,
            "edge_groups": a.edge_groups,
            "seconds": {"load": round(t_load, 2), "oneshot": round(t_q, 2), "total": round(time.time() - t0, 2)}}


# --------------------------------------------------------------------------- inspect

def weights_cfg(qcfg):
    grp = next(iter(qcfg["config_groups"].values()))
    return grp["weights"]


def dequant_module(tensors, mod, w, layout):
    gi = tensors.get(mod + ".weight_g_idx")
    return pf.ct_pack_quantized_dequant(
        tensors[mod + ".weight_packed"], tensors[mod + ".weight_scale"], tensors[mod + ".weight_shape"],
        w["num_bits"], w.get("group_size"), tensors.get(mod + ".weight_zero_point"),
        gi if (gi is not None and (gi >= 0).all()) else None, packing=layout)


def cmd_inspect(a):
    tensors, meta = pf.read_ckpt(a.ckpt)
    cfg = json.load(open(os.path.join(a.ckpt, "config.json")))
    qcfg = cfg.get("quantization_config")
    w = weights_cfg(qcfg)
    bits = w["num_bits"]
    mod = a.module
    lin = {k[len(mod) + 1:]: tstr(v) for k, v in tensors.items() if k.startswith(mod + ".")}
    packed = tensors[mod + ".weight_packed"]
    shape = tensors[mod + ".weight_shape"].tolist()
    facts = {
        "cmd": "inspect", "ckpt": os.path.abspath(a.ckpt), "module": mod,
        "files": sorted(os.listdir(a.ckpt)),
        "safetensors_metadata": meta,
        "linear_tensors": lin,
        "weight_shape_value": shape,
        "non_quant_tensors": {k: tstr(v) for k, v in tensors.items() if not k.endswith(QSUFFIXES)},
        "config_dtype": cfg.get("dtype", cfg.get("torch_dtype")),
        "quantization_config": qcfg,
        "packed_cols": packed.shape[1],
        "packed_cols_if_stream": -(-shape[1] * bits // 32),
        "packed_cols_if_per_word": -(-shape[1] // (32 // bits)),
        "weight_packed_row0_hex": [hex(int(x) & 0xFFFFFFFF) for x in packed[0, :4]],
    }
    for layout in LAYOUTS:
        try:
            u = (pf.unpack_stream if layout == "stream" else pf.unpack_per_word)(packed, bits, shape[1], 1)
            facts[f"code_histogram_{layout}"] = {int(k): int(v) for k, v in zip(*torch.unique(u, return_counts=True))}
        except Exception as e:  # noqa: BLE001
            facts[f"code_histogram_{layout}"] = pf.err(e)
    zp = tensors.get(mod + ".weight_zero_point")
    if zp is not None:
        facts["zero_point_raw"] = tstr(zp)
        if zp.dtype == torch.int32:
            facts["zero_point_row0_hex"] = [hex(int(x) & 0xFFFFFFFF) for x in zp[0, :4]]
            facts["zero_point_packed_rows_if_stream"] = -(-shape[0] * bits // 32)
            facts["zero_point_packed_rows_if_per_word"] = -(-shape[0] // (32 // bits))
            for layout in LAYOUTS:
                unpack = pf.unpack_stream if layout == "stream" else pf.unpack_per_word
                try:
                    z = unpack(zp, bits, shape[0], 0)
                    facts[f"zero_point_unsigned_histogram_{layout}"] = {
                        int(k): int(v) for k, v in zip(*torch.unique(z, return_counts=True))}
                except Exception as e:  # noqa: BLE001
                    facts[f"zero_point_unsigned_histogram_{layout}"] = pf.err(e)
    gi = tensors.get(mod + ".weight_g_idx")
    if gi is not None:
        facts["weight_g_idx_first_40"] = gi[:40].tolist()
    return facts


# --------------------------------------------------------------------------- load

def quant_modules(tensors):
    return sorted({k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")})


def reference_model(ckpt, tensors, w, layout):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(ckpt)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {k: v.float() for k, v in tensors.items() if not k.endswith(QSUFFIXES)}
    for mod in quant_modules(tensors):
        sd[mod + ".weight"] = dequant_module(tensors, mod, w, layout)
    _, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    return m.eval()


def effective_weight(module, in_f, dtype):
    """Effective weight of a (possibly still compressed) Linear via forward(eye)."""
    with torch.no_grad():
        y = module(torch.eye(in_f, dtype=dtype).unsqueeze(0))[0]
    b = getattr(module, "bias", None)
    if b is not None:
        y = y - b.to(y.dtype)
    return y.t().float()


def cmd_load(a, ids=None):
    tensors, _ = pf.read_ckpt(a.ckpt)
    cfg = json.load(open(os.path.join(a.ckpt, "config.json")))
    w = weights_cfg(cfg["quantization_config"])
    if ids is None:
        ids = torch.randint(3, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(123))
    refs, ref_w = {}, {}
    for layout in LAYOUTS:
        try:
            rm = reference_model(a.ckpt, tensors, w, layout)
            with torch.no_grad():
                refs[layout] = rm(ids).logits.float()
            ref_w[layout] = pf.get_module(rm, a.module).weight.detach().float()
        except Exception as e:  # noqa: BLE001
            log("reference", layout, pf.err(e))
    facts = {"cmd": "load", "ckpt": os.path.abspath(a.ckpt), "versions": versions(), "results": []}
    if "stream" in refs and "per_word" in refs:
        facts["reference_stream_vs_per_word_weight_maxdiff"] = round(
            (ref_w["stream"] - ref_w["per_word"]).abs().max().item(), 6)
    if getattr(a, "orig", None):
        from transformers import AutoModelForCausalLM
        om = AutoModelForCausalLM.from_pretrained(a.orig, dtype=torch.float32)
        ow = pf.get_module(om, a.module).weight.detach().float()
        facts["orig_vs_dequant_stream_weight_maxdiff"] = round((ow - ref_w["stream"]).abs().max().item(), 5)
        facts["orig_weight_absmax"] = round(ow.abs().max().item(), 5)
        with torch.no_grad():
            facts["orig_vs_reference_stream_logits_maxdiff"] = round(
                (om(ids).logits.float() - refs["stream"]).abs().max().item(), 4)
    for dt in a.dtypes.split(","):
        for dq in a.dequantize.split(","):
            facts["results"].append(load_one(a.ckpt, dt, dq, ids, refs, ref_w, a.module))
    return facts


def load_one(ckpt, dt, dq, ids, refs, ref_w, modname):
    from transformers import AutoModelForCausalLM
    dtype = getattr(torch, dt)
    r = {"loader": "transformers", "dtype": dt, "dequantize": dq}
    t0 = time.time()
    try:
        kw = {}
        if dq != "default":
            from transformers import CompressedTensorsConfig
            kw["quantization_config"] = CompressedTensorsConfig(dequantize=(dq == "true"))
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map="cpu", **kw)
        r["load_seconds"] = round(time.time() - t0, 2)
        mod = pf.get_module(model, modname)
        r["module_class"] = f"{type(mod).__module__}.{type(mod).__name__}"
        r["module_params_after_load"] = {n: tstr(p) for n, p in list(mod.named_parameters()) + list(mod.named_buffers())}
        r["quantization_status"] = str(getattr(getattr(mod, "quantization_scheme", None), "weights", None) and
                                       getattr(mod, "quantization_status", None))
        with torch.no_grad():
            t1 = time.time()
            logits = model(ids).logits.float()
            r["forward_seconds"] = round(time.time() - t1, 3)
        r["module_params_after_forward"] = {n: tstr(p) for n, p in list(mod.named_parameters()) + list(mod.named_buffers())}
        r["logits_finite"] = bool(torch.isfinite(logits).all())
        r["logits_maxdiff_vs_ref"] = {k: round((logits - v).abs().max().item(), 4) for k, v in refs.items()}
        r["argmax_agree_vs_ref_stream"] = round((logits.argmax(-1) == refs["stream"].argmax(-1)).float().mean().item(), 3)
        wt = getattr(mod, "weight", None)
        if wt is not None and wt.dtype.is_floating_point and tuple(wt.shape) == tuple(ref_w["stream"].shape):
            r["loaded_weight_maxdiff_vs_dequant"] = {k: round((wt.float() - v).abs().max().item(), 6)
                                                     for k, v in ref_w.items()}
        try:
            ew = effective_weight(mod, ref_w["stream"].shape[1], dtype)
            r["effective_weight_maxdiff_vs_dequant"] = {k: round((ew - v).abs().max().item(), 6)
                                                        for k, v in ref_w.items()}
        except Exception as e:  # noqa: BLE001
            r["identity_forward_error"] = pf.err(e)
        r["ok"] = True
        del model
    except Exception as e:  # noqa: BLE001
        r["ok"] = False
        r["error"] = pf.err(e)
        r["traceback_tail"] = traceback.format_exc().strip().splitlines()[-4:]
    return r


# --------------------------------------------------------------------------- foreign writer

def rtn_quant(wt, bits, group_size, asym, g_idx=None):
    """Our own RTN quantizer in compressed-tensors conventions (signed codes).
    Returns q (int64 signed), scale [out, G] fp16, zp [out, G] int64 or None."""
    out_f, in_f = wt.shape
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if g_idx is None:
        g_idx = torch.arange(in_f) // group_size
    n_groups = int(g_idx.max()) + 1
    w = wt.float()
    scale = torch.empty(out_f, n_groups)
    zp = torch.zeros(out_f, n_groups, dtype=torch.int64)
    for gi in range(n_groups):
        cols = w[:, g_idx == gi]
        if asym:
            mn = cols.min(1).values.clamp(max=0)
            mx = cols.max(1).values.clamp(min=0)
            s = ((mx - mn) / (qmax - qmin)).clamp(min=1e-8)
            zp[:, gi] = (torch.round(-mn / s) + qmin).clamp(qmin, qmax).long()
        else:
            s = (cols.abs().max(1).values / ((qmax - qmin) / 2)).clamp(min=1e-8)
        scale[:, gi] = s
    scale = scale.half()
    s_full = scale.float()[:, g_idx]
    z_full = zp.float()[:, g_idx]
    q = torch.clamp(torch.round(w / s_full) + z_full, qmin, qmax).long()
    return q, scale, (zp if asym else None)


def cmd_foreign(a):
    """Write pack-quantized checkpoints with our own code and load them."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    src_sd = load_file(os.path.join(a.model, "model.safetensors"))
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    bits, gs = a.bits, a.group_size
    off = 1 << (bits - 1)
    sd, ref_sd = {}, {}
    gperm = torch.Generator().manual_seed(5)
    for k, v in src_sd.items():
        if k.startswith("model.layers.") and k.endswith("proj.weight"):
            mod = k[: -len(".weight")]
            in_f = v.shape[1]
            g_idx = None
            if a.g_idx == "perm":
                perm = torch.randperm(in_f, generator=gperm)
                g_idx = torch.empty(in_f, dtype=torch.int64)
                g_idx[perm] = torch.arange(in_f) // gs  # column perm[j] belongs to group j // gs
            q, scale, zp = rtn_quant(v, bits, gs, a.asym, g_idx)
            pack = pf.pack_stream if a.packing == "stream" else pf.pack_per_word
            sd[mod + ".weight_packed"] = pack(q + off, bits, 1)
            sd[mod + ".weight_scale"] = scale
            sd[mod + ".weight_shape"] = torch.tensor(list(v.shape), dtype=torch.int64)
            if zp is not None:
                sd[mod + ".weight_zero_point"] = pack(zp + off, bits, 0)
            if g_idx is not None:
                sd[mod + ".weight_g_idx"] = g_idx.to(torch.int32)
            gidx_eff = g_idx if g_idx is not None else torch.arange(in_f) // gs
            z_full = zp.float()[:, gidx_eff] if zp is not None else 0.0
            ref_sd[k] = scale.float()[:, gidx_eff] * (q.float() - z_full)
        else:
            sd[k] = v
            ref_sd[k] = v.float()
    # Self-check of our packer against our unpacker.
    mod0 = a.module
    chk = dequant_module(sd, mod0, {"num_bits": bits, "group_size": gs}, a.packing)
    assert torch.allclose(chk, ref_sd[mod0 + ".weight"]), "own pack/unpack mismatch"

    wargs = {"num_bits": bits, "type": "int", "symmetric": not a.asym, "strategy": "group", "group_size": gs}
    if a.g_idx == "perm":
        wargs["actorder"] = "group"
    full = {
        "config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None, "output_activations": None,
                                      "targets": ["Linear"],
                                      "weights": {**wargs, "actorder": wargs.get("actorder"), "block_structure": None,
                                                  "dynamic": False, "observer": "minmax", "observer_kwargs": {},
                                                  "scale_dtype": None, "zp_dtype": None}}},
        "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
        "sparsity_config": {}, "transform_config": {}, "version": "0.19.0",
    }
    minimal = {"quant_method": "compressed-tensors", "format": "pack-quantized",
               "quantization_status": "compressed",
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": wargs}}, "ignore": ["lm_head"]}

    def drop_w(key):
        m = copy.deepcopy(minimal)
        m["config_groups"]["group_0"]["weights"].pop(key, None)
        return m

    variants = {
        "full": full,
        "minimal": minimal,
        "minimal-quantization_status": {k: v for k, v in minimal.items() if k != "quantization_status"},
        "minimal(quantization_status=frozen)": {**minimal, "quantization_status": "frozen"},
        "minimal-ignore": {k: v for k, v in minimal.items() if k != "ignore"},
        "minimal-format": {k: v for k, v in minimal.items() if k != "format"},
        "minimal-format+group_format": {**{k: v for k, v in minimal.items() if k != "format"},
                                        "config_groups": {"group_0": {"targets": ["Linear"], "weights": wargs,
                                                                      "format": "pack-quantized"}}},
        "minimal-weights.type": drop_w("type"),
        "minimal-weights.strategy": drop_w("strategy"),
        "minimal-weights.symmetric": drop_w("symmetric"),
        "minimal(targets=re:.*proj$)": {**minimal, "config_groups": {"group_0": {
            "targets": ["re:.*proj$"], "weights": wargs}}},
    }
    if a.g_idx == "perm":
        variants["minimal-weights.actorder(g_idx present)"] = drop_w("actorder")

    os.makedirs(a.out, exist_ok=True)
    save_file(sd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    for fn in os.listdir(a.model):
        if fn.startswith("tokenizer") or fn == "generation_config.json":
            shutil.copy(os.path.join(a.model, fn), a.out)
    ids = torch.randint(3, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(123))
    ref_model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ref_model.load_state_dict(ref_sd, strict=True)
    with torch.no_grad():
        ref_logits = ref_model(ids).logits.float()
    seq = torch.arange(ref_sd[mod0 + ".weight"].shape[1]) // gs
    facts = {"cmd": "foreign", "out": os.path.abspath(a.out), "versions": versions(), "bits": bits,
             "packing": a.packing,
             "group_size": gs, "asym": a.asym, "g_idx": a.g_idx,
             "linear_tensors": {k[len(mod0) + 1:]: tstr(v) for k, v in sd.items() if k.startswith(mod0 + ".")},
             "configs": variants, "results": {}}
    for name, qc in variants.items():
        c = dict(cfg)
        c["quantization_config"] = qc
        json.dump(c, open(os.path.join(a.out, "config.json"), "w"), indent=2)
        r = {}
        try:
            m = AutoModelForCausalLM.from_pretrained(a.out, dtype=getattr(torch, a.dtype), device_map="cpu")
            with torch.no_grad():
                lg = m(ids).logits.float()
            mod = pf.get_module(m, mod0)
            r["ok"] = True
            r["module_class"] = type(mod).__name__
            r["logits_maxdiff_vs_own_reference"] = round((lg - ref_logits).abs().max().item(), 4)
            ew = effective_weight(mod, ref_sd[mod0 + ".weight"].shape[1], getattr(torch, a.dtype))
            r["effective_weight_maxdiff_vs_own_dequant"] = round((ew - ref_sd[mod0 + ".weight"]).abs().max().item(), 6)
            if a.g_idx == "perm":
                # what you'd get if the loader ignored g_idx (sequential groups)
                q0 = pf.unpack_stream(sd[mod0 + ".weight_packed"], bits, len(seq), 1) - off
                zp0 = (pf.unpack_stream(sd[mod0 + ".weight_zero_point"], bits, q0.shape[0], 0) - off).float() \
                    if a.asym else torch.zeros(1, sd[mod0 + ".weight_scale"].shape[1])
                w_seq = sd[mod0 + ".weight_scale"].float()[:, seq] * (q0.float() - zp0[:, seq])
                r["effective_weight_maxdiff_vs_sequential_groups"] = round((ew - w_seq).abs().max().item(), 6)
            del m
        except Exception as e:  # noqa: BLE001
            r["ok"] = False
            r["error"] = pf.err(e)
            r["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
        facts["results"][name] = r
    # leave the "minimal" config in place
    c = dict(cfg)
    c["quantization_config"] = minimal
    json.dump(c, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    return facts


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def qargs(p):
        p.add_argument("--model", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--bits", type=int, default=4)
        p.add_argument("--group-size", type=int, default=32)
        p.add_argument("--strategy", default="group", choices=["group", "channel"])
        p.add_argument("--asym", action="store_true")
        p.add_argument("--actorder", default="none", choices=["none", "weight", "static", "group", "dynamic"])
        p.add_argument("--scheme", default=None, help="preset scheme (e.g. W4A16) instead of config_groups")
        p.add_argument("--dtype", default="auto", help="model load dtype for oneshot (auto = checkpoint dtype)")
        p.add_argument("--nsamples", type=int, default=8)
        p.add_argument("--seqlen", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--edge-groups", action="store_true")

    def largs(p):
        p.add_argument("--module", default=PROBE_MODULE)
        p.add_argument("--dtypes", default="float16,bfloat16,float32")
        p.add_argument("--dequantize", default="default,true",
                       help="comma list of: default (config as saved), true, false (CompressedTensorsConfig)")

    qargs(sub.add_parser("quantize"))
    p = sub.add_parser("inspect")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--module", default=PROBE_MODULE)
    p = sub.add_parser("load")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--orig", default=None)
    largs(p)
    p = sub.add_parser("foreign")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--g-idx", default="none", choices=["none", "perm"])
    p.add_argument("--packing", default="stream", choices=["stream", "per_word"],
                   help="per_word = compressed-tensors <= 0.17 layout (differs for 3/5/6/7 bit)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--module", default=PROBE_MODULE)
    p = sub.add_parser("all")
    qargs(p)
    largs(p)

    a = ap.parse_args()
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints -> stderr; stdout = JSON only
    try:
        if a.cmd == "quantize":
            res = cmd_quantize(a)
        elif a.cmd == "inspect":
            res = cmd_inspect(a)
        elif a.cmd == "load":
            res = cmd_load(a)
        elif a.cmd == "foreign":
            res = cmd_foreign(a)
        else:
            res = {"quantize": cmd_quantize(a)}
            a.ckpt = a.out
            res["inspect"] = cmd_inspect(a)
            a.orig = res["quantize"]["src"]
            res["load"] = cmd_load(a)
    finally:
        sys.stdout = real_stdout
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
