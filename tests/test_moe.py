"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE; transformers' own classes with fused
experts): every expert calibrated on the tokens routed to it, exports with per-expert names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests_support import export_files
from quantkit.cli import cli
from quantkit.moe import MIN_EXPERT_TOKENS, expert_mlp
from quantkit.job import run
from quantkit.recipe import Recipe
from quantkit.runtime import load_quantized

# uniform importance and no AWQ: the comparisons below isolate the expert solves
CALIB = dict(nsamples=8, seqlen=64, group_size=64)


def quantize(source: Path, out: Path | None, calib: Path, **recipe):
    return run(str(source), out, Recipe(**{**CALIB, **recipe}), calibration=str(calib), force=True, show_progress=False)


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def stored_names(folder: Path) -> set[str]:
    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            names.update(fh.keys())
    return names


@pytest.mark.parametrize("model_type, fmt", [("mixtral", "gptq"), ("qwen2_moe", "compressed-tensors"),
                                             ("qwen3_moe", "gptq")])
def test_export_loads_back_to_the_in_memory_quantized_model(tiny_moe, calib_text, tmp_path, model_type, fmt):
    # Qwen3-MoE: its last layer dense (mlp_only_layers), as some checkpoints mix them
    source = tiny_moe(model_type, layers=3, mlp_only_layers=[2]) if model_type == "qwen3_moe" else tiny_moe(model_type)
    result = quantize(source, tmp_path / "out", calib_text, format=fmt)
    names = stored_names(tmp_path / "out")
    block, (g, u, d) = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2"))}.get(
        model_type, ("mlp", ("gate_proj", "up_proj", "down_proj")))
    leaf = "qweight" if fmt == "gptq" else "weight_packed"
    for layer in range(2):
        for e in range(4):  # one quantized tensor per expert Linear, under the checkpoint's names
            assert {f"model.layers.{layer}.{block}.experts.{e}.{n}.{leaf}" for n in (g, u, d)} <= names
        assert f"model.layers.{layer}.{block}.gate.weight" in names  # the router stays unquantized
    assert not any("gate_up_proj" in n or ".experts.down_proj" in n for n in names), "no fused tensors on disk"
    if model_type == "qwen3_moe":
        assert {f"model.layers.2.mlp.{n}.{leaf}" for n in (g, u, d)} <= names and not any(".2.mlp.experts" in n for n in names)
        assert "model.layers.2" not in json.loads((tmp_path / "out" / "quantkit.json").read_text())["experts"]
    if model_type == "qwen2_moe":
        assert f"model.layers.0.mlp.shared_expert.down_proj.{leaf}" in names
        assert "model.layers.0.mlp.shared_expert_gate.weight" in names
    loaded = load_quantized(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(logits(loaded), logits(result.model), rtol=0, atol=1e-5)
    experts = loaded.model.layers[0].mlp.experts.gate_up_proj
    with safe_open(str(source / "model.safetensors"), framework="pt") as fh:
        original = fh.get_tensor(f"model.layers.0.{block}.experts.0.{g}.weight")
    # the experts are quantized: every group of 64 inputs of a row holds at most 2^4 levels (the FP rows: 64)
    groups = experts[0, : original.shape[0]].reshape(-1, CALIB["group_size"])
    assert max(row.unique().numel() for row in groups) <= 16 < min(row.unique().numel() for row in original.reshape(groups.shape))
    manifest = json.loads((tmp_path / "out" / "quantkit.json").read_text())
    coverage = manifest["experts"]["model.layers.0"]
    assert sum(coverage["per_expert"]) == CALIB["nsamples"] * CALIB["seqlen"] * 2  # top-2: every token twice
    assert coverage["tokens"]["min"] == min(coverage["per_expert"])
    assert "## Expert calibration coverage" in (tmp_path / "out" / "README.md").read_text()


def test_streaming_run_writes_the_in_memory_runs_export(tiny_moe, calib_text, tmp_path):
    """The CLI streams each layer (and each expert) from the checkpoint; the export is the same."""
    source = tiny_moe("qwen2_moe")
    quantize(source, tmp_path / "memory", calib_text, bits=3, sym=False, format="compressed-tensors", rotate=True)
    r = CliRunner().invoke(cli, ["quantize", str(source), str(tmp_path / "streamed"), "--calibration", str(calib_text),
                                 "--nsamples", "8", "--seqlen", "64", "--group-size", "64", "--bits", "3", "--asym",
                                 "--format", "compressed-tensors", "--rotate", "--quiet"])
    assert r.exit_code == 0, r.output
    assert export_files(tmp_path / "streamed") == export_files(tmp_path / "memory")


def test_format_auto_exports_moe_as_compressed_tensors(tiny_moe, calib_text, tmp_path):
    """--format auto picks gptq for a dense W4 sym recipe but compressed-tensors for an MoE model
    (transformers' GPTQ path leaves fused experts unloaded: test_transformers_gptq_leaves_moe_experts_unloaded)."""
    r = CliRunner().invoke(cli, ["quantize", str(tiny_moe("mixtral")), str(tmp_path / "q"), "--calibration", str(calib_text),
                                 "--nsamples", "4", "--seqlen", "64", "--group-size", "64", "--method", "rtn", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["format"] == "compressed-tensors"
    assert "→ export compressed-tensors" in r.stderr  # the steps the run announces name the format it writes
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert Recipe(group_size=64).export_format == "gptq"  # the same recipe on a dense model


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_transformers_loads_the_compressed_tensors_export(tiny_moe, calib_text, tmp_path, model_type):
    """transformers (5.25 + compressed-tensors 0.19) merges our per-expert tensors into its fused
    experts (Mixtral: renaming block_sparse_moe to mlp) and decompresses them."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    quantize(tiny_moe(model_type), tmp_path / "out", calib_text, format="compressed-tensors")
    ours = load_quantized(tmp_path / "out", dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for mine, other in zip(ours.model.layers, theirs.model.layers):
        for name in ("gate_up_proj", "down_proj"):  # transformers decompresses the experts in fp16
            w = getattr(mine.mlp.experts, name)
            assert torch.equal(getattr(other.mlp.experts, name).float(), w.half().float()), name
    a, b = logits(ours), logits(theirs)
    assert (a - b).norm() <= 2e-3 * a.norm()  # fp16-rounded expert weights (tests/test_interop.py's bound)


def unreachable_expert_model(tiny_moe, tmp_path: Path) -> Path:
    """A 6-expert Mixtral whose layer-0 router never picks expert 5: rows ±M v and ±M u give two
    logits ≥ 0 for every token, and expert 5's row is 0."""
    source = tiny_moe("mixtral", experts=6)
    folder = tmp_path / "unreachable"
    folder.mkdir()
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.block_sparse_moe.gate.weight"
    v, u = torch.randn(2, tensors[name].shape[1], generator=torch.Generator().manual_seed(0))
    tensors[name] = torch.stack([v, -v, u, -u, torch.randn_like(v), torch.zeros_like(v)]) * 5
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_an_expert_no_token_reaches_is_calibrated_by_the_fallback(tiny_moe, calib_text, tmp_path):
    source = unreachable_expert_model(tiny_moe, tmp_path)
    r = CliRunner().invoke(cli, ["quantize", str(source), str(tmp_path / "out"), "--calibration", str(calib_text),
                                 "--nsamples", "8", "--seqlen", "64", "--group-size", "64", "--quiet"])
    assert r.exit_code == 0, r.output
    warning = next(line for line in r.stderr.splitlines() if line.startswith("warning: layer 0:"))
    assert "expert 5 (0 tokens)" in warning and "all-experts fallback" in warning
    coverage = json.loads((tmp_path / "out" / "quantkit.json").read_text())["experts"]["model.layers.0"]
    assert coverage["per_expert"][5] == 0 and coverage["tokens"]["min"] == 0
    assert coverage["fallback"] == [e for e, n in enumerate(coverage["per_expert"]) if n < MIN_EXPERT_TOKENS]
    assert 5 in coverage["fallback"]
    assert "expert 5 (0 tokens)" in (tmp_path / "out" / "README.md").read_text()
    from quantkit.model import load_model

    loaded = load_quantized(tmp_path / "out", dtype=torch.float32)
    fp = load_model(str(source))[0].model.layers[0].mlp.experts
    # solved on all the layer's tokens: the FP expert near its 4-bit grid (measured 0.145 relative; plain
    # rounding of Gaussian rows ≈ 0.09; zero, NaN-fed or unsolved weights ≥ 1)
    for name in ("gate_up_proj", "down_proj"):
        w, original = getattr(loaded.model.layers[0].mlp.experts, name)[5], getattr(fp, name)[5]
        assert torch.isfinite(w).all() and (w - original).norm() < 0.3 * original.norm(), name


def routed_inputs(model, layer: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP model's MoE input x [T, C] at ``layer`` on ``tokens`` and the router's experts [T, k]."""
    block = model.model.layers[layer].mlp
    seen = {}

    def hook(_module, args):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1])

    handle = block.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(tokens)
        handle.remove()
        _, _, experts = block.gate(seen["x"])
    return seen["x"], experts


def test_gptq_on_experts_beats_rtn_on_their_routed_tokens(tiny_moe, calib_text, tmp_path):
    from quantkit.model import load_model
    from quantkit.job import calibration_tokens

    source = tiny_moe("mixtral")
    recipe = dict(bits=3, group_size=64, importance="uniform", awq=False)
    gptq = quantize(source, None, calib_text, method="gptq", **recipe).model
    rtn = quantize(source, None, calib_text, method="rtn", **recipe).model
    fp, tokenizer, _ = load_model(str(source))
    tokens, _ = calibration_tokens(tokenizer, str(calib_text), Recipe(**{**CALIB, **recipe}))
    x, routed = routed_inputs(fp, 0, tokens)
    for e in range(4):
        xe = x[(routed == e).any(-1)]
        errors = {}
        for label, model in (("gptq", gptq), ("rtn", rtn)):
            outs = []
            for m in (fp, model):
                experts = m.model.layers[0].mlp.experts
                inter = experts.down_proj.shape[2]
                gate_up = experts.gate_up_proj[e].float()
                outs.append(expert_mlp(xe, gate_up[:inter], gate_up[inter:], experts.down_proj[e].float(), experts.act_fn))
            errors[label] = ((outs[1] - outs[0]).norm() / outs[0].norm()).item()
        print(f"expert {e}: {xe.shape[0]} tokens, relative output error GPTQ {errors['gptq']:.4f}, RTN {errors['rtn']:.4f}")
        assert errors["gptq"] < 0.9 * errors["rtn"], (e, errors)


def test_resume_in_the_middle_of_a_layers_experts(tiny_moe, calib_text, tmp_path, monkeypatch):
    from quantkit.export import Exporter

    source = tiny_moe("mixtral")
    args = ["quantize", str(source), None, "--calibration", str(calib_text), "--nsamples", "8", "--seqlen", "64",
            "--group-size", "64", "--quiet"]
    whole = CliRunner().invoke(cli, [str(a) if a else str(tmp_path / "whole") for a in args])
    assert whole.exit_code == 0, whole.output
    real = Exporter.add_experts

    def interrupt(self, index, expert, results):
        if (index, expert) == (1, 2):
            raise KeyboardInterrupt
        return real(self, index, expert, results)

    monkeypatch.setattr(Exporter, "add_experts", interrupt)
    resumed = [str(a) if a else str(tmp_path / "resumed") for a in args]
    r = CliRunner().invoke(cli, resumed)
    assert r.exit_code == 1 and "interrupted after 1 layers" in r.stderr
    monkeypatch.setattr(Exporter, "add_experts", real)
    r = CliRunner().invoke(cli, resumed + ["--resume"])
    assert r.exit_code == 0, (r.output, r.exc_info)
    assert export_files(tmp_path / "resumed") == export_files(tmp_path / "whole")


PEAK_RSS = """
import sys
from quantkit.job import run
from quantkit.recipe import Recipe
run(sys.argv[1], sys.argv[2], Recipe(nsamples=4, seqlen=64, group_size=128), calibration=sys.argv[3], keep_model=False,
    show_progress=False, max_shard_bytes=8 * 2**20)
# VmHWM: this process image's peak (ru_maxrss would also count the parent's pages at fork time)
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def test_peak_rss_grows_less_than_the_added_experts(tiny_moe, calib_text, tmp_path):
    """The CLI's streaming run holds one expert at a time: 12 more experts per layer must add less
    to the peak than those experts' bytes (the issue's criterion; a run holding them all adds ~2×)."""
    hidden, inter = 512, 1024
    rss = {}
    for experts in (4, 16):
        source = tiny_moe("mixtral", experts=experts, layers=1, hidden=hidden, intermediate=inter)
        out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(source), str(tmp_path / f"q{experts}"), str(calib_text)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        rss[experts] = int(out.stdout.split()[-1])
    added = 12 * 3 * hidden * inter * 4  # fp32 checkpoint bytes of 12 more experts in one layer
    growth = rss[16] - rss[4]
    print(f"peak RSS 4 experts {rss[4] / 2**20:.0f} MiB, 16 experts {rss[16] / 2**20:.0f} MiB; "
          f"12 more experts: {added / 2**20:.0f} MiB")
    assert growth < added


def test_two_data_parallel_processes_give_the_single_process_export(tiny_moe, calib_text, tmp_path):
    """Expert solves are spread over the ranks (expert e on rank e mod 2) and shared; token counts
    and Hessians are summed over both ranks' batches."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 40 windows of 128 tokens = 2 forward batches (32 + 8): one per rank
    args = [str(tiny_moe("qwen2_moe")), "--calibration", str(calib_text), "--nsamples", "40", "--seqlen", "128",
            "--group-size", "64", "--quiet"]
    single = [sys.executable, "-m", "quantkit", "quantize"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "quantkit",
                "quantize"]
    subprocess.run(single + [args[0], str(tmp_path / "single")] + args[1:], env=env, check=True, capture_output=True)
    r = subprocess.run(torchrun + [args[0], str(tmp_path / "dp")] + args[1:], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert export_files(tmp_path / "dp") == export_files(tmp_path / "single")


def test_make_moe_export_builds_a_loadable_export(tmp_path):
    from conftest import make_moe_export

    out = make_moe_export(tmp_path / "vllm-moe", "qwen2_moe", "compressed-tensors")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["ignore"][1:] == ["re:.*mlp\\.gate$", "re:.*mlp\\.shared_expert_gate$"]
    assert load_quantized(out, dtype=torch.float32).config.num_experts == 4


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_rotated_moe_keeps_its_function_and_exports(tiny_moe, calib_text, tmp_path, model_type):
    """RSQ's rotation through an MoE block: router, shared expert and its gate rotated in place,
    each routed expert as it is fetched. At 8 bits the rotated model stays the FP model; a missed
    reader or writer scrambles the residual stream. Measured (relative logit error, 8-bit): rotated
    0.014-0.015, unrotated 0.018-0.031, routed experts left unrotated 0.40."""
    from quantkit.model import load_model

    source = tiny_moe(model_type)
    result = quantize(source, tmp_path / "out", calib_text, bits=8, rotate=True, format="compressed-tensors")
    fp, _, _ = load_model(str(source))
    a, b = logits(fp), logits(result.model)
    assert (a - b).norm() < 0.1 * a.norm()
    torch.testing.assert_close(logits(load_quantized(tmp_path / "out", dtype=torch.float32)), b, rtol=0, atol=1e-5)


# --- MoE exports in the peers' loaders (venvs from bench/peers/make_venvs.sh; tests/interop/peer.py) ---
MOE_PEER_EXPORTS = [("mixtral", "gptq"), ("qwen2_moe", "gptq"), ("mixtral", "compressed-tensors"),
                    ("qwen2_moe", "compressed-tensors")]


def _moe_load(name: str, path: Path, ids: Path, folder: Path, loader: str = "transformers", dtype: str = "float32",
              **extra) -> dict:
    return {"id": f"{name}-{loader}", "kind": "logits", "path": str(path), "loader": loader, "dtype": dtype,
            "inputs": str(ids), "out": str(folder / f"{name}-{loader}.safetensors"), **extra}


@pytest.fixture(scope="module")
def moe_peers(tmp_path_factory) -> dict:
    """One peer process per venv over the MoE exports: transformers loads of every export (gptq: the
    loading report only), and in ``latest`` GPTQModel.load of the gptq ones (last: GPTQModel swaps
    transformers' fused MoE blocks for per-expert Linears process-wide). -> {venv: (results, exports, ids, folder)}"""
    from conftest import make_moe_export
    from test_interop import peer_python, random_ids, run_peer

    root = tmp_path_factory.mktemp("moe-peers")
    exports = {f"{m}-{f}": make_moe_export(root / f"{m}-{f}", m, f) for m, f in MOE_PEER_EXPORTS}
    ids = random_ids(exports["mixtral-gptq"], root)  # one tokenizer (vocabulary) for all
    runs = {}
    for venv in ("latest", "vllm"):
        try:
            peer_python(venv)
        except pytest.skip.Exception as e:
            runs[venv] = str(e)
            continue
        folder = root / venv
        folder.mkdir()
        jobs = [_moe_load(n, p, ids, folder, forward=not n.endswith("gptq")) for n, p in exports.items()
                if venv == "latest" or not n.endswith("gptq")]  # the vllm venv has no gptqmodel
        if venv == "latest":
            jobs += [_moe_load(n, p, ids, folder, "gptqmodel", "float16", backend="torch", weights=True)
                     for n, p in exports.items() if n.endswith("gptq")]
        runs[venv] = (run_peer(venv, jobs, folder), exports, ids, folder)
    return runs


def _peer(moe_peers: dict, venv: str):
    run = moe_peers[venv]
    if isinstance(run, str):
        pytest.skip(run)
    return run


def _ours(export: Path, ids: Path):
    model = load_quantized(export, dtype=torch.float32)
    with torch.no_grad():
        return model, model(input_ids=load_file(str(ids))["input_ids"]).logits


@pytest.mark.parametrize("venv", ["latest", "vllm"])
@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_peer_transformers_loads_the_compressed_tensors_moe_export(moe_peers, venv, model_type):
    """transformers + compressed-tensors of the ``latest`` venv (5.25 / 0.20) and of vLLM's pins (5.19 / 0.17)
    merge our per-expert tensors into their fused experts with nothing missing or left over, and give our
    logits up to fp16-rounded weights (measured 2.6e-4..4.5e-4)."""
    from test_interop import LOGIT_RTOL

    results, exports, ids, folder = _peer(moe_peers, venv)
    name = f"{model_type}-compressed-tensors"
    facts = results[f"{name}-transformers"]
    assert "error" not in facts, facts["error"]
    assert facts["missing_keys"] == [] and facts["unexpected_keys"] == [], facts
    theirs = load_file(str(folder / f"{name}-transformers.safetensors"))["logits"]
    _, ours = _ours(exports[name], ids)
    assert ((theirs - ours).norm() / ours.norm()).item() <= LOGIT_RTOL["fp16-weights"]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_transformers_gptq_leaves_moe_experts_unloaded(moe_peers, model_type):
    """Upstream limit (transformers 5.25 + optimum 2.3 + gptqmodel 7.6): the GPTQ path swaps only nn.Linear
    modules for quantized ones (optimum's GPTQQuantizer.convert_model), and transformers 5's experts are one
    fused module of 3-D parameters (gate_up_proj [E, 2I, C], down_proj [E, C, I]): every per-expert GPTQ
    tensor is reported unexpected and the fused parameters missing, i.e. randomly initialised, with a
    warning only. Qwen2-MoE's shared_expert_gate (a Linear to 1 output, kept FP like the router) is also
    expected quantized. GPTQModel.load (below) is the loader for gptq MoE exports."""
    results, exports, _, _ = _peer(moe_peers, "latest")
    facts = results[f"{model_type}-gptq-transformers"]
    assert "error" not in facts, facts["error"]
    layers = json.loads((exports[f"{model_type}-gptq"] / "config.json").read_text())["num_hidden_layers"]
    fused = {f"model.layers.{i}.mlp.experts.{p}" for i in range(layers) for p in ("gate_up_proj", "down_proj")}
    shared_gate = {f"model.layers.{i}.mlp.shared_expert_gate.{leaf}" for i in range(layers)
                   for leaf in ("qweight", "qzeros", "scales", "g_idx")} if model_type == "qwen2_moe" else set()
    assert set(facts["missing_keys"]) == fused | shared_gate
    ours = {n.replace(".block_sparse_moe.", ".mlp.") for n in stored_names(exports[f"{model_type}-gptq"])
            if ".experts." in n}  # transformers renames Mixtral's block_sparse_moe to mlp
    assert len(ours) == layers * 4 * 3 * 4  # 4 experts × 3 Linears × 4 tensors
    assert ours <= set(facts["unexpected_keys"])


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_gptqmodel_loads_the_gptq_moe_export(moe_peers, model_type):
    """GPTQModel.load (7.6, TorchLinear, fp16) defuses transformers' experts into per-expert Linears.
    Qwen2-MoE: every expert's weight through its kernel is ours up to fp16 rounding, and the logits are
    ours (measured 1.0e-3). Mixtral: GPTQModel's module tree on transformers 5 reads the experts as
    mlp.experts.E.gate_proj/up_proj/down_proj, while our export keeps the checkpoint's
    block_sparse_moe.experts.E.w1/w3/w2 (what vLLM and transformers' own renaming read): it refuses."""
    from test_interop import LOGIT_RTOL, WEIGHT_RTOL

    results, exports, ids, folder = _peer(moe_peers, "latest")
    name = f"{model_type}-gptq"
    facts = results[f"{name}-gptqmodel"]
    if model_type == "mixtral":
        assert "Missing required quantized weights" in facts.get("error", ""), facts
        assert "model.layers.0.mlp.experts.0.gate_proj.qweight" in facts["error"]
        return
    assert "error" not in facts, facts["error"]
    theirs = load_file(str(folder / f"{name}-gptqmodel.safetensors"))
    model, ours = _ours(exports[name], ids)
    checked = 0
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        inter = experts.down_proj.shape[2]
        for e in range(experts.gate_up_proj.shape[0]):
            for part, w in (("gate_proj", experts.gate_up_proj[e, :inter]), ("up_proj", experts.gate_up_proj[e, inter:]),
                            ("down_proj", experts.down_proj[e])):
                err = (theirs[f"model.layers.{i}.mlp.experts.{e}.{part}"] - w).abs()
                assert (err <= WEIGHT_RTOL["latest"] * w.abs()).all(), (i, e, part, err.max().item())
                checked += 1
    assert checked == len(model.model.layers) * 4 * 3
    assert ((theirs["logits"] - ours).norm() / ours.norm()).item() <= LOGIT_RTOL["half"]
