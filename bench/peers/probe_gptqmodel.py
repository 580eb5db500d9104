#!/usr/bin/env python
"""Probe GPTQModel's GPTQ (v1, checkpoint_format "gptq") checkpoints on CPU.

Run inside the gptqmodel venv (bench/peers/make_venvs.sh):

  export GPTQMODEL_CPU_WORKERS=2 TORCH_COMPILE_DISABLE=1   # see FORMATS.md gotchas
  PY=~/.cache/quantkit-peers/gptqmodel/bin/python
  $PY bench/peers/make_tiny_llama.py /tmp/tiny
  $PY bench/peers/probe_gptqmodel.py quantize --model /tmp/tiny --out /tmp/g4 --bits 4 --group-size 32
  $PY bench/peers/probe_gptqmodel.py inspect --ckpt /tmp/g4
  $PY bench/peers/probe_gptqmodel.py load --ckpt /tmp/g4 --loaders hf,gptqmodel --dtypes float16,bfloat16,float32
  $PY bench/peers/probe_gptqmodel.py config-keys --ckpt /tmp/g4
  $PY bench/peers/probe_gptqmodel.py foreign --model /tmp/tiny --out /tmp/fg4 [--asym --zero-pack word|field|v2]
  $PY bench/peers/probe_gptqmodel.py all --model /tmp/tiny --out /tmp/g4 [quantize args]

Each subcommand prints one JSON document of facts on stdout (logs go to
stderr). `load` checks the loaded kernels against an independent dequant
(bench/peers/peer_formats.py): identity-forward of one Linear gives the
kernel's effective W, compared with W = scale*(q - z) under the zero-point
hypotheses "v1" (z = stored+1, per field), "v1_word" (+1 added to the packed
word) and "v2" (z = stored). `foreign` writes GPTQ checkpoints with our own
RTN + packer (no gptqmodel code) and checks both loaders reproduce them.
"""
import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_formats as pf  # noqa: E402

import torch  # noqa: E402

PROBE_MODULE = "model.layers.0.self_attn.q_proj"
ZERO_MODES = ("v1", "v1_word", "v2")


def log(*a):
    print("[probe_gptqmodel]", *a, file=sys.stderr, flush=True)


@contextlib.contextmanager
def quiet_stdout():
    """gptqmodel prints progress to stdout; keep our stdout pure JSON."""
    old = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = old


def versions():
    import importlib.metadata as md
    out = {}
    for p in ("gptqmodel", "transformers", "optimum", "torch", "safetensors", "accelerate"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


# --------------------------------------------------------------------------- quantize

def calib_samples(n, seqlen, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (seqlen,), generator=g).tolist(),
             "attention_mask": [1] * seqlen} for _ in range(n)]


def cmd_quantize(a):
    from gptqmodel import GPTQModel, QuantizeConfig
    src = a.model
    if a.edge_groups:
        from make_tiny_llama import edge_group_copy
        src = edge_group_copy(a.model, a.out.rstrip("/") + ".src", a.group_size)
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    qkw = dict(bits=a.bits, group_size=a.group_size, desc_act=a.desc_act, sym=not a.asym)
    if a.desc_act:
        qkw["act_group_aware"] = False  # GAR is incompatible with desc_act
    if a.no_gar:
        qkw["act_group_aware"] = False
    t0 = time.time()
    with quiet_stdout():
        qc = QuantizeConfig(**qkw)
        lkw = {} if a.dtype == "auto" else {"dtype": getattr(torch, a.dtype)}
        model = GPTQModel.load(src, qc, device="cpu", **lkw)
        t_load = time.time() - t0
        model.quantize(calib_samples(a.nsamples, a.seqlen, cfg["vocab_size"], a.seed), batch_size=1)
        t_q = time.time() - t0 - t_load
        if os.path.exists(a.out):
            shutil.rmtree(a.out)
        model.save(a.out)
    t_all = time.time() - t0
    saved_dtype = json.load(open(os.path.join(a.out, "config.json"))).get("dtype")
    return {"cmd": "quantize", "versions": versions(), "src": src, "out": os.path.abspath(a.out),
            "load_dtype_arg": a.dtype, "saved_config_dtype": saved_dtype,
            "quantize_config_args": qkw, "nsamples": a.nsamples, "seqlen": a.seqlen,
            "edge_groups": a.edge_groups,
            "seconds": {"load": round(t_load, 2), "quantize": round(t_q, 2), "total": round(t_all, 2)},
            "env": {"GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS")}}


# --------------------------------------------------------------------------- inspect

def cmd_inspect(a):
    tensors, meta = pf.read_ckpt(a.ckpt)
    cfg = json.load(open(os.path.join(a.ckpt, "config.json")))
    qcfg = cfg.get("quantization_config")
    bits = qcfg["bits"]
    mod = a.module
    lin = {k[len(mod) + 1:]: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
           for k, v in tensors.items() if k.startswith(mod + ".")}
    non_quant = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                 for k, v in tensors.items() if not any(s in k for s in ("qweight", "qzeros", "scales", "g_idx"))}
    qz = tensors[mod + ".qzeros"]
    qw = tensors[mod + ".qweight"]
    out_f = qw.shape[1]
    stored = pf.unpack_stream(qz, bits, out_f, 1)
    g_idx = tensors[mod + ".g_idx"]
    gs = qcfg.get("group_size")
    facts = {
        "cmd": "inspect", "ckpt": os.path.abspath(a.ckpt), "module": mod,
        "files": sorted(os.listdir(a.ckpt)),
        "safetensors_metadata": meta,
        "linear_tensors": lin,
        "non_quant_tensors": non_quant,
        "config_dtype": cfg.get("dtype", cfg.get("torch_dtype")),
        "quantization_config": qcfg,
        "quantize_config.json": (json.load(open(os.path.join(a.ckpt, "quantize_config.json")))
                                 if os.path.exists(os.path.join(a.ckpt, "quantize_config.json")) else None),
        "qzeros_word0_hex": [hex(int(x) & 0xFFFFFFFF) for x in qz[0, :4]],
        "stored_zero_field_histogram": {int(k): int(v) for k, v in zip(*torch.unique(stored, return_counts=True))},
        "g_idx_first_40": g_idx[:40].tolist(),
        "g_idx_is_sequential": bool((g_idx.long() == torch.arange(g_idx.numel()) // gs).all()) if gs and gs > 0 else None,
        "qweight_rows_per_in": f"{qw.shape[0]} rows for in={g_idx.numel()} -> {g_idx.numel() * bits / 32}",
    }
    return facts


# --------------------------------------------------------------------------- load

def quant_modules(tensors):
    return sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})


def reference_model(ckpt, tensors, bits, zero_mode):
    """float32 dense Llama with every quantized Linear replaced by our dequant."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(ckpt)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("cpu"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {}
    for k, v in tensors.items():
        if not any(k.endswith(s) for s in (".qweight", ".qzeros", ".scales", ".g_idx")):
            sd[k] = v.float()
    for mod in quant_modules(tensors):
        sd[mod + ".weight"] = pf.gptq_v1_dequant(tensors[mod + ".qweight"], tensors[mod + ".qzeros"],
                                                 tensors[mod + ".scales"], tensors[mod + ".g_idx"],
                                                 bits, zero_mode)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    m.eval()
    return m


def identity_weight(module, in_f, dtype):
    """Effective W [out, in] of a quantized linear via forward(eye)."""
    with torch.no_grad():
        y = module(torch.eye(in_f, dtype=dtype).unsqueeze(0))[0]
    b = getattr(module, "bias", None)
    if b is not None:
        y = y - b.to(y.dtype)
    return y.t().float()


def cmd_load(a):
    tensors, _ = pf.read_ckpt(a.ckpt)
    cfg = json.load(open(os.path.join(a.ckpt, "config.json")))
    bits = cfg["quantization_config"]["bits"]
    vocab = cfg["vocab_size"]
    ids = torch.randint(3, vocab, (1, a.seqlen), generator=torch.Generator().manual_seed(123))
    refs = {}
    ref_w = {}
    for zm in ZERO_MODES:
        rm = reference_model(a.ckpt, tensors, bits, zm)
        with torch.no_grad():
            refs[zm] = rm(ids).logits.float()
        ref_w[zm] = pf.get_module(rm, a.module).weight.detach().float()
    facts = {"cmd": "load", "ckpt": os.path.abspath(a.ckpt), "versions": versions(), "results": [],
             "reference_logits_absmax": round(refs["v1"].abs().max().item(), 4),
             "reference_v1_vs_v2_logits_maxdiff": round((refs["v1"] - refs["v2"]).abs().max().item(), 4),
             "reference_v1_vs_v1_word_weight_maxdiff": round((ref_w["v1"] - ref_w["v1_word"]).abs().max().item(), 6)}
    if a.orig:
        from transformers import AutoModelForCausalLM
        om = AutoModelForCausalLM.from_pretrained(a.orig, dtype=torch.float32)
        with torch.no_grad():
            ol = om(ids).logits.float()
        facts["orig_vs_reference_v1_logits_maxdiff"] = round((ol - refs["v1"]).abs().max().item(), 4)
        ow = pf.get_module(om, a.module).weight.detach().float()
        facts["orig_vs_dequant_weight_maxdiff"] = round((ow - ref_w["v1"]).abs().max().item(), 5)
        facts["orig_weight_absmax"] = round(ow.abs().max().item(), 5)
    for loader in a.loaders.split(","):
        for dt in a.dtypes.split(","):
            facts["results"].append(load_one(a.ckpt, loader, dt, ids, refs, ref_w, a.module, a.backend))
    return facts


def load_one(ckpt, loader, dt, ids, refs, ref_w, modname, backend=None):
    dtype = getattr(torch, dt)
    r = {"loader": loader, "dtype": dt, "backend": backend}
    t0 = time.time()
    try:
        with quiet_stdout():
            if loader == "hf":
                from transformers import AutoModelForCausalLM
                kw = {}
                if backend:
                    from transformers import GPTQConfig
                    qc = json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]
                    kw["quantization_config"] = GPTQConfig.from_dict({**qc, "backend": backend})
                model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map="cpu", **kw)
                hf = model
            elif loader == "gptqmodel":
                from gptqmodel import GPTQModel
                kw = {"backend": backend} if backend else {}
                model = GPTQModel.load(ckpt, device="cpu", dtype=dtype, **kw)
                hf = model.model
            else:
                raise ValueError(loader)
        r["load_seconds"] = round(time.time() - t0, 2)
        mod = pf.get_module(hf, modname)
        r["kernel"] = type(mod).__name__
        r["kernel_module"] = type(mod).__module__
        kernels = sorted({type(m).__name__ for n, m in hf.named_modules() if hasattr(m, "qweight")})
        r["kernels_all"] = kernels
        r["model_param_dtype"] = str(next(hf.parameters()).dtype)
        r["module_qzero_format"] = getattr(mod, "qzero_format", lambda: None)() if callable(
            getattr(mod, "qzero_format", None)) else None
        with torch.no_grad():
            t1 = time.time()
            logits = hf(ids).logits.float()
            r["forward_seconds"] = round(time.time() - t1, 3)
        r["logits_dtype"] = dt
        r["logits_finite"] = bool(torch.isfinite(logits).all())
        r["logits_maxdiff_vs_ref"] = {zm: round((logits - refs[zm]).abs().max().item(), 4) for zm in ZERO_MODES}
        r["argmax_agree_vs_ref_v1"] = round((logits.argmax(-1) == refs["v1"].argmax(-1)).float().mean().item(), 3)
        try:
            w = identity_weight(mod, ref_w["v1"].shape[1], dtype)
            r["kernel_weight_maxdiff_vs_dequant"] = {zm: round((w - ref_w[zm]).abs().max().item(), 6)
                                                     for zm in ZERO_MODES}
            r["kernel_weight_best_match"] = min(r["kernel_weight_maxdiff_vs_dequant"],
                                                key=r["kernel_weight_maxdiff_vs_dequant"].get)
        except Exception as e:  # noqa: BLE001
            r["identity_forward_error"] = pf.err(e)
        r["ok"] = True
        del model, hf
    except Exception as e:  # noqa: BLE001
        r["ok"] = False
        r["error"] = pf.err(e)
        r["traceback_tail"] = traceback.format_exc().strip().splitlines()[-3:]
    return r


# --------------------------------------------------------------------------- config keys

def cmd_config_keys(a):
    """Which quantization_config keys does transformers need to load the ckpt?
    Each variant: copy config, drop key(s), load with transformers, compare
    logits with the unmodified checkpoint."""
    from transformers import AutoModelForCausalLM
    cfg = json.load(open(os.path.join(a.ckpt, "config.json")))
    qc = cfg["quantization_config"]
    vocab = cfg["vocab_size"]
    ids = torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(7))
    dtype = getattr(torch, a.dtype)

    def run(qcfg):
        tmp = tempfile.mkdtemp(prefix="qk-cfgkeys-")
        try:
            for fn in os.listdir(a.ckpt):
                if fn.endswith(".safetensors") or fn.startswith("tokenizer") or fn == "generation_config.json":
                    os.symlink(os.path.join(os.path.abspath(a.ckpt), fn), os.path.join(tmp, fn))
            c = dict(cfg)
            if qcfg is None:
                c.pop("quantization_config", None)
            else:
                c["quantization_config"] = qcfg
            json.dump(c, open(os.path.join(tmp, "config.json"), "w"), indent=2)
            with quiet_stdout(), torch.no_grad():
                m = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, device_map="cpu")
                return m(ids).logits.float(), type(pf.get_module(m, a.module)).__name__
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    base, kern = run(qc)
    out = {"cmd": "config-keys", "ckpt": os.path.abspath(a.ckpt), "dtype": a.dtype, "baseline_kernel": kern,
           "note": "logits_maxdiff is vs the unmodified checkpoint; 0.0 = key not needed", "variants": {}}
    variants = {f"drop:{k}": {kk: vv for kk, vv in qc.items() if kk != k} for k in qc}
    minimal = {"quant_method": "gptq", "bits": qc["bits"], "group_size": qc["group_size"]}
    variants["minimal:quant_method+bits+group_size"] = minimal
    variants["minimal+desc_act+sym"] = {**minimal, "desc_act": qc.get("desc_act", False), "sym": qc.get("sym", True)}
    variants["minimal+desc_act+sym+checkpoint_format"] = {**variants["minimal+desc_act+sym"],
                                                          "checkpoint_format": "gptq"}
    variants["only:quant_method+bits"] = {"quant_method": "gptq", "bits": qc["bits"]}
    variants["flip:desc_act"] = {**qc, "desc_act": not qc.get("desc_act", False)}
    variants["flip:sym"] = {**qc, "sym": not qc.get("sym", True)}
    variants["checkpoint_format=gptq_v2"] = {**qc, "checkpoint_format": "gptq_v2", "format": "gptq_v2"}
    variants["no quantization_config"] = None
    for name, v in variants.items():
        try:
            lg, kern = run(v)
            out["variants"][name] = {"ok": True, "kernel": kern,
                                     "logits_maxdiff": round((lg - base).abs().max().item(), 4)}
        except Exception as e:  # noqa: BLE001
            out["variants"][name] = {"ok": False, "error": pf.err(e)}
    return out


# --------------------------------------------------------------------------- foreign writer

def gptq_rtn(wt, bits, gs, sym, g_idx, zmin=0):
    """Own RTN quantizer in GPTQ conventions: unsigned codes q in [0, 2**b-1],
    zero z (unsigned), W ~= s*(q - z). zmin=1 keeps asym zeros off 0."""
    maxq = (1 << bits) - 1
    out_f, in_f = wt.shape
    n_groups = int(g_idx.max()) + 1
    w = wt.float()
    scale = torch.empty(n_groups, out_f)
    zero = torch.empty(n_groups, out_f, dtype=torch.int64)
    for g in range(n_groups):
        cols = w[:, g_idx == g]
        if sym:
            s = (2 * cols.abs().max(1).values / maxq).clamp(min=1e-8)
            z = torch.full((out_f,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            mn, mx = cols.min(1).values.clamp(max=0), cols.max(1).values.clamp(min=0)
            s = ((mx - mn) / maxq).clamp(min=1e-8)
            z = torch.round(-mn / s).clamp(zmin, maxq).long()
        scale[g], zero[g] = s, z
    scale = scale.half()
    q = torch.clamp(torch.round(w / scale.float()[g_idx].t()) + zero[g_idx].t(), 0, maxq).long()  # [out, in]
    return q, scale, zero


def pack_gptq_v1_zeros(zero, bits, mode):
    """zero [G, out] unsigned -> qzeros [G, out*bits/32] int32 in v1 (stored z-1).
    mode "field": each field holds (z-1) & mask; "word": pack z, then subtract
    the 0x..1111 constant from each int32 word (borrows across fields)."""
    mask = (1 << bits) - 1
    if mode == "v2":
        return pf.pack_stream(zero, bits, 1)  # gptq_v2: z stored as is
    if mode == "field" or 32 % bits:
        return pf.pack_stream((zero - 1) & mask, bits, 1)
    rep = 0
    for j in range(32 // bits):
        rep |= 1 << (j * bits)
    words = pf.pack_stream(zero, bits, 1).to(torch.int64) & pf.MASK32
    words = (words - rep) & pf.MASK32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def cmd_foreign(a):
    """Write GPTQ v1 checkpoints with our own code; load with transformers and GPTQModel."""
    from safetensors.torch import load_file, save_file
    src_sd = load_file(os.path.join(a.model, "model.safetensors"))
    cfg = json.load(open(os.path.join(a.model, "config.json")))
    bits, gs, sym = a.bits, a.group_size, not a.asym
    gen = torch.Generator().manual_seed(5)
    sd, ref_sd = {}, {}
    for k, v in src_sd.items():
        if k.startswith("model.layers.") and k.endswith("proj.weight"):
            mod = k[: -len(".weight")]
            in_f = v.shape[1]
            if a.desc_act:
                perm = torch.randperm(in_f, generator=gen)
                g_idx = torch.empty(in_f, dtype=torch.int64)
                g_idx[perm] = torch.arange(in_f) // gs
            else:
                g_idx = torch.arange(in_f) // gs
            q, scale, zero = gptq_rtn(v, bits, gs, sym, g_idx, zmin=a.zmin)
            sd[mod + ".qweight"] = pf.pack_stream(q.t(), bits, 0)
            sd[mod + ".qzeros"] = pack_gptq_v1_zeros(zero, bits, a.zero_pack)
            sd[mod + ".scales"] = scale
            sd[mod + ".g_idx"] = g_idx.to(torch.int32)
            ref_sd[k] = scale.float()[g_idx].t() * (q.float() - zero.float()[g_idx].t())
            if mod == a.module:
                n_zero0 = int((zero == 0).sum())
        else:
            sd[k] = v.half() if v.is_floating_point() else v
            ref_sd[k] = v.float()
    mod0 = a.module
    os.makedirs(a.out, exist_ok=True)
    for fn in os.listdir(a.model):
        if fn.startswith("tokenizer") or fn == "generation_config.json":
            shutil.copy(os.path.join(a.model, fn), a.out)
    fmt = "gptq_v2" if a.zero_pack == "v2" else "gptq"
    full = {"bits": bits, "checkpoint_format": fmt, "desc_act": a.desc_act, "format": fmt,
            "group_size": gs, "lm_head": False, "method": "gptq", "pack_dtype": "int32",
            "quant_method": "gptq", "sym": sym, "meta": {"quantizer": ["quantkit-probe:0"]}}
    minimal = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": a.desc_act, "sym": sym}
    if fmt != "gptq":
        minimal["checkpoint_format"] = fmt
    variants = {"full": (full, True), "minimal": (minimal, True), "minimal,no g_idx tensor": (minimal, False)}
    if a.asym:
        # GPTQModel.load gates sym=False v1 on meta.quantizer naming gptqmodel >= 0.9.0
        variants["full+meta.quantizer=gptqmodel:7.6.0"] = (
            {**full, "meta": {"quantizer": ["gptqmodel:7.6.0"]}}, True)
    from transformers import AutoModelForCausalLM
    ids = torch.randint(3, cfg["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(123))
    ref_model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    ref_model.load_state_dict(ref_sd, strict=True)
    with torch.no_grad():
        ref_logits = ref_model(ids).logits.float()
    res = {"cmd": "foreign", "out": os.path.abspath(a.out), "versions": versions(), "bits": bits,
           "group_size": gs, "sym": sym, "desc_act": a.desc_act, "zero_pack": a.zero_pack, "zmin": a.zmin,
           "probe_module_zero_points_equal_0": n_zero0, "configs": {k: v[0] for k, v in variants.items()},
           "results": {}}
    for name, (qc, with_gidx) in variants.items():
        c = dict(cfg)
        c["quantization_config"] = qc
        json.dump(c, open(os.path.join(a.out, "config.json"), "w"), indent=2)
        wsd = sd if with_gidx else {k: v for k, v in sd.items() if not k.endswith(".g_idx")}
        save_file(wsd, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
        for loader in a.loaders.split(","):
            r = {}
            if loader == "hf" and not with_gidx:
                # transformers/optimum leave g_idx uninitialised (torch.empty): IndexError with
                # garbage indices, or a native abort inside the inductor-compiled TorchLinear.
                res["results"][f"{name} [{loader}]"] = {"ok": False, "skipped": "g_idx left uninitialised"}
                continue
            try:
                with quiet_stdout():
                    if loader == "hf":
                        m = AutoModelForCausalLM.from_pretrained(a.out, dtype=getattr(torch, a.dtype), device_map="cpu")
                        hf = m
                    else:
                        from gptqmodel import GPTQModel
                        m = GPTQModel.load(a.out, device="cpu", dtype=getattr(torch, a.dtype))
                        hf = m.model
                with torch.no_grad():
                    lg = hf(ids).logits.float()
                mod = pf.get_module(hf, mod0)
                r["ok"] = True
                r["kernel"] = type(mod).__name__
                r["logits_maxdiff_vs_own_reference"] = round((lg - ref_logits).abs().max().item(), 4)
                w = identity_weight(mod, ref_sd[mod0 + ".weight"].shape[1], getattr(torch, a.dtype))
                r["kernel_weight_maxdiff_vs_own_dequant"] = round((w - ref_sd[mod0 + ".weight"]).abs().max().item(), 6)
                del m, hf
            except Exception as e:  # noqa: BLE001
                r["ok"] = False
                r["error"] = pf.err(e)
            res["results"][f"{name} [{loader}]"] = r
    return res


# --------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def qargs(p):
        p.add_argument("--model", required=True, help="float HF model dir (make_tiny_llama.py)")
        p.add_argument("--out", required=True)
        p.add_argument("--bits", type=int, default=4)
        p.add_argument("--group-size", type=int, default=32)
        p.add_argument("--asym", action="store_true", help="sym=False")
        p.add_argument("--desc-act", action="store_true")
        p.add_argument("--no-gar", action="store_true", help="act_group_aware=False")
        p.add_argument("--nsamples", type=int, default=8)
        p.add_argument("--seqlen", type=int, default=64)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dtype", default="auto", help="GPTQModel.load dtype for quantization (auto: bf16 on CPU)")
        p.add_argument("--edge-groups", action="store_true",
                       help="force all-positive / all-negative groups (zero=0 / zero=max)")

    def largs(p, ckpt=True):
        if ckpt:
            p.add_argument("--ckpt", required=True)
        p.add_argument("--module", default=PROBE_MODULE)
        p.add_argument("--loaders", default="hf,gptqmodel")
        p.add_argument("--dtypes", default="float16,bfloat16,float32")
        p.add_argument("--backend", default=None, help="gptqmodel BACKEND value, e.g. torch, torch_fused")
        p.add_argument("--orig", default=None, help="unquantized model dir for error context")
        p.add_argument("--seqlen", type=int, default=16)

    qargs(sub.add_parser("quantize"))
    p = sub.add_parser("inspect")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--module", default=PROBE_MODULE)
    largs(sub.add_parser("load"))
    p = sub.add_parser("config-keys")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--module", default=PROBE_MODULE)
    p.add_argument("--dtype", default="float16")
    p = sub.add_parser("foreign")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--desc-act", action="store_true", help="random act-order g_idx")
    p.add_argument("--zero-pack", default="word", choices=["word", "field", "v2"],
                   help="how the v1 '-1' is applied to qzeros (see FORMATS.md)")
    p.add_argument("--zmin", type=int, default=0, help="clamp asym zero points to >= zmin (1 avoids z=0)")
    p.add_argument("--loaders", default="hf,gptqmodel")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--module", default=PROBE_MODULE)
    p = sub.add_parser("all")
    qargs(p)
    p.add_argument("--module", default=PROBE_MODULE)
    p.add_argument("--loaders", default="hf,gptqmodel")
    p.add_argument("--dtypes", default="float16,bfloat16,float32")
    p.add_argument("--backend", default=None)
    p.add_argument("--skip-config-keys", action="store_true")

    a = ap.parse_args()
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # gptqmodel prints banners/progress to stdout; keep ours pure JSON
    try:
        res = dispatch(a)
    finally:
        sys.stdout = real_stdout
    print(json.dumps(res, indent=1, default=str))


def dispatch(a):
    if a.cmd == "quantize":
        res = cmd_quantize(a)
    elif a.cmd == "inspect":
        res = cmd_inspect(a)
    elif a.cmd == "load":
        res = cmd_load(a)
    elif a.cmd == "config-keys":
        res = cmd_config_keys(a)
    elif a.cmd == "foreign":
        res = cmd_foreign(a)
    else:
        res = {"quantize": cmd_quantize(a)}
        a.ckpt = a.out
        res["inspect"] = cmd_inspect(a)
        a.orig = a.out.rstrip("/") + ".src" if a.edge_groups else a.model
        a.seqlen = 16
        res["load"] = cmd_load(a)
        if not a.skip_config_keys:
            a.dtype = "float16"
            res["config_keys"] = cmd_config_keys(a)
    return res


if __name__ == "__main__":
    main()
