"""Peer side of tests/test_interop.py, run with a peer venv's python (bench/peers/make_venvs.sh).

    PEER_PYTHON tests/interop/peer.py JOBS.json RESULTS.json

JOBS.json is a list of jobs, run in order in this one process (peer imports cost 10-25 s):
  {"id", "kind": "logits", "path", "loader": "transformers" | "gptqmodel", "dtype", "backend"?,
   "weights"?, "inputs", "out"}
      load checkpoint ``path`` with the peer's loader and write its logits for ``inputs``
      (safetensors, "input_ids" int64 [B, L]) to ``out`` (safetensors, "logits" fp32 [B, L, V]);
      with "weights", also every decoder Linear's effective weight "<module>" fp32 [N, K], read
      back through the peer's kernel (forward of the identity, bias removed).
  {"id", "kind": "gptqmodel" | "llmcompressor", "model", "save", "bits", "group_size", "sym",
   "calibration"}
      quantize float model ``model`` with that tool (GPTQ, calibration "input_ids" [n, L] from the
      safetensors file ``calibration``, fp16) and save its checkpoint to ``save``.
RESULTS.json maps each job id to facts (seconds, kernel class, package versions) or {"error": "..."};
a failing job does not stop the others. The peers' own stdout chatter goes to stderr.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import shutil
import sys
import time
import traceback

import torch
from safetensors.torch import load_file, save_file

PACKAGES = ("transformers", "optimum", "gptqmodel", "compressed-tensors", "llmcompressor", "torch")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The decoder layers' Linear-like modules (the peer's quantized kernels, or Linear for compressed-tensors)."""
    return {n: m for n, m in model.named_modules() if ".layers." in n and n.endswith("_proj")}


def effective_weight(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] fp32 as the kernel computes it: module(I_K) = I_K Wᵀ + b."""
    k = module.in_features
    y = module(torch.eye(k, dtype=dtype).unsqueeze(0))[0]
    if getattr(module, "bias", None) is not None:
        y = y - module.bias.to(y.dtype)
    return y.t().float().contiguous()


@torch.no_grad()
def logits(job: dict) -> dict:
    dtype = getattr(torch, job["dtype"])
    if job["loader"] == "gptqmodel":
        from gptqmodel import GPTQModel

        kwargs = {"backend": job["backend"]} if job.get("backend") else {}
        model = GPTQModel.load(job["path"], device="cpu", dtype=dtype, **kwargs).model
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {}
        if job.get("backend"):  # force a kernel: rebuild the checkpoint's own config with a backend
            from transformers import AwqConfig, GPTQConfig

            qc = AutoConfig.from_pretrained(job["path"]).quantization_config
            config_class = AwqConfig if qc["quant_method"] == "awq" else GPTQConfig
            kwargs["quantization_config"] = config_class.from_dict({**qc, "backend": job["backend"]})
        model = AutoModelForCausalLM.from_pretrained(job["path"], dtype=dtype, device_map="cpu", **kwargs)
    ids = load_file(job["inputs"])["input_ids"]
    tensors = {"logits": model(input_ids=ids).logits.float().contiguous()}
    linears = decoder_linears(model)
    if job.get("weights"):
        tensors.update({name: effective_weight(m, dtype) for name, m in linears.items()})
    save_file(tensors, job["out"])
    return {"kernels": sorted({type(m).__name__ for m in linears.values()})}


def calibration(job: dict) -> torch.Tensor:
    return load_file(job["calibration"])["input_ids"]


def quantize_gptqmodel(job: dict) -> dict:
    from gptqmodel import GPTQModel, QuantizeConfig

    config = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], sym=job["sym"], desc_act=False)
    model = GPTQModel.load(job["model"], config, device="cpu", dtype=torch.float16)
    model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calibration(job)],
                   batch_size=1)
    shutil.rmtree(job["save"], ignore_errors=True)
    model.save(job["save"])
    return {}


def quantize_llmcompressor(job: dict) -> dict:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = calibration(job)
    weights = {"num_bits": job["bits"], "type": "int", "symmetric": job["sym"], "strategy": "group",
               "group_size": job["group_size"]}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], actorder=None)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float16)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    shutil.rmtree(job["save"], ignore_errors=True)
    model.save_pretrained(job["save"], save_compressed=True)
    return {}


KINDS = {"logits": logits, "gptqmodel": quantize_gptqmodel, "llmcompressor": quantize_llmcompressor}


def main(jobs_path: str, results_path: str) -> None:
    results = {}
    for job in json.loads(open(jobs_path).read()):
        started = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):
                facts = KINDS[job["kind"]](job)
        except Exception as e:  # reported per job; the test decides whether it was expected
            traceback.print_exc(file=sys.stderr)
            facts = {"error": f"{type(e).__name__}: {e}"}
        facts["seconds"] = round(time.perf_counter() - started, 2)
        results[job["id"]] = facts
        print(f"[peer] {job['id']}: {facts}", file=sys.stderr, flush=True)
    results["versions"] = versions()
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
