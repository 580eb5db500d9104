"""Hostile and broken inputs (issue 16): each ends in one clear line and exit status 1, and no file
outside OUTPUT_DIR (nor a pre-existing OUTPUT_DIR that is not a quantkit export) changes.

Every case builds its scenario in its own folder from a tiny model and an export made once per
module; the folder is snapshotted (file hashes, link targets) before and after the command."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import make_text, make_tiny_model
from quantkit.cli import cli

LOG_PREFIXES = ("quantizing ", "steps per layer", "calibration:", "--format auto chose", "warning:", "resuming after")
RTN = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--quiet"]
GPTQ = ["--nsamples", "2", "--seqlen", "32", "--group-size", "32", "--quiet"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama, calibration text and a 4-bit GPTQ-format RTN export of it (read-only: cases copy them)."""
    root = tmp_path_factory.mktemp("hostile")
    model = make_tiny_model(root / "model", layers=2, hidden=64)
    calib = root / "calib.txt"
    calib.write_text(make_text(1500, seed=3))
    r = invoke("quantize", model, root / "export", *RTN)
    assert r.exit_code == 0, r.output
    return {"model": model, "calib": calib, "export": root / "export"}


@dataclass
class Env:
    """One case's folder: a fresh copy of the model and (on demand) of the export."""

    root: Path
    base: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch

    def __post_init__(self) -> None:
        self.cleanup: list = []
        self.model = self.root / "model"
        shutil.copytree(self.base["model"], self.model)
        self.calib = self.base["calib"]

    def export(self) -> Path:
        out = self.root / "export"
        if not out.exists():
            shutil.copytree(self.base["export"], out)
        return out

    def edit_json(self, path: Path, edit) -> None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    def edit_tensors(self, path: Path, edit) -> None:
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})

    def eval_args(self, model: Path) -> list:
        return ["eval", model, "--dataset", self.calib, "--seqlen", 32, "--max-tokens", 64]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: content hash, link target or 'dir'} of everything under ``root``, no link followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_line(result) -> str:
    """The one error line: last on stderr, after nothing but quantkit's own log lines."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), result.stderr
    assert all(line.startswith(LOG_PREFIXES) for line in lines[:-1]), result.stderr
    assert "internal error" not in lines[-1], lines[-1]
    return lines[-1]


CASES: dict[str, tuple] = {}


def case(expect: str, keep: tuple[str, ...] = ()):
    """Register a scenario: ``fn(env)`` builds it and returns the command line; the error line must
    contain ``expect``; only paths starting with one of ``keep`` may change."""

    def register(fn):
        CASES[fn.__name__] = (fn, expect, keep)
        return fn

    return register


# 1. data loss: OUTPUT_DIR may never be the current or model folder (or hold them), --force only over an export


@case("is the current folder")
def output_is_current_folder(env):
    x = env.root / "x"
    x.mkdir()
    (x / "keep").write_text("mine")
    env.monkeypatch.chdir(x)
    return ["quantize", env.model, ".", "--force", *RTN]


@case("current folder or a parent")
def output_is_parent_of_current_folder(env):
    (env.root / "x").mkdir()
    env.monkeypatch.chdir(env.root / "x")
    return ["quantize", env.model, env.root, "--force", *RTN]


@case("source model folder")
def output_is_model(env):
    return ["quantize", env.model, env.model, "--force", *RTN]


@case("source model folder")
def output_is_parent_of_model(env):
    return ["quantize", env.model, env.root, "--force", *RTN]


@case("source model folder")
def output_inside_model(env):
    return ["quantize", env.model, env.model / "q", *RTN]


@case("--force replaces only an empty folder or an earlier quantkit export")
def force_over_user_folder(env):
    (env.root / "out").mkdir()
    (env.root / "out" / "thesis.tex").write_text("years of work")
    return ["quantize", env.model, env.root / "out", "--force", *RTN]


@case("which its quantkit.json does not list")
def force_over_export_with_user_file(env):
    (env.export() / "notes.txt").write_text("mine")
    return ["quantize", env.model, env.export(), "--force", *RTN]


@case("quantkit did not write")
def force_over_fake_manifest(env):
    (env.root / "out").mkdir()
    (env.root / "out" / "quantkit.json").write_text("{}")
    (env.root / "out" / "config.json").write_text("{}")
    return ["quantize", env.model, env.root / "out", "--force", *RTN]


@case("symbolic link")
def force_over_symlinked_output(env):
    (env.root / "elsewhere").mkdir()
    (env.root / "out").symlink_to(env.root / "elsewhere")
    return ["quantize", env.model, env.root / "out", "--force", *RTN]


# 2. the temporary folder is ours alone


@case("not quantkit's temporary folder")
def partial_is_a_symlink(env):
    (env.root / "elsewhere").mkdir()
    (env.root / ".out.partial").symlink_to(env.root / "elsewhere")
    return ["quantize", env.model, env.root / "out", "--resume", *RTN]


@case("another quantize is writing")
def concurrent_run(env):
    fd = os.open(env.root / ".out.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running quantize holds it
    env.cleanup.append(lambda: os.close(fd))
    return ["quantize", env.model, env.root / "out", *RTN]


@case("resume state", keep=(".out.partial",))
def resume_state_not_json(env):
    (env.root / ".out.partial").mkdir()
    (env.root / ".out.partial" / "resume.json").write_text("{not json")
    return ["quantize", env.model, env.root / "out", "--resume", *RTN]


@case("'layers_done' is not an integer", keep=(".out.partial",))
def resume_state_wrong_types(env):
    (env.root / ".out.partial").mkdir()
    state = {"recipe": {}, "source": "", "tokens_sha256": "", "layers_done": "2", "files": {}}
    (env.root / ".out.partial" / "resume.json").write_text(json.dumps(state))
    return ["quantize", env.model, env.root / "out", "--resume", *RTN]


# 3. loading reads exactly the files named, inside the folder; the pickle gate sees every file


def _index_to(env, name: str) -> Path:
    """The model with its weights moved to shard ``name`` listed by an index."""
    weights = load_file(env.model / "model.safetensors")
    (env.model / "model.safetensors").unlink()
    save_file(weights, env.model / "dummy.safetensors", metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for k in weights}}
    (env.model / "model.safetensors.index.json").write_text(json.dumps(index))
    return env.model


@case("pickle weights (weights.bin)")
def index_names_a_pickle(env):
    model = _index_to(env, "weights.bin")
    torch.save({"x": torch.zeros(1)}, model / "weights.bin")
    return env.eval_args(model)


@case("resolves outside")
def index_names_parent_path(env):
    return env.eval_args(_index_to(env, "../../etc/passwd"))


@case("only file names inside the model folder are allowed")
def index_names_absolute_path(env):
    return env.eval_args(_index_to(env, "/etc/passwd"))


@case("resolves outside")
def shard_is_symlink_out_of_folder(env):
    outside = env.root / "outside.safetensors"
    shutil.move(env.model / "model.safetensors", outside)
    (env.model / "model.safetensors").symlink_to(outside)
    return ["quantize", env.model, env.root / "out", *RTN]


@case("resolves outside")
def tokenizer_is_symlink_out_of_folder(env):
    secret = env.root / "secret.json"
    shutil.move(env.model / "tokenizer.json", secret)
    (env.model / "tokenizer.json").symlink_to(secret)
    return ["quantize", env.model, env.root / "out", *RTN]


# 4. silently wrong before: now errors


def _edit_qc(env, key, value) -> Path:
    export = env.export()
    env.edit_json(export / "config.json", lambda c: c["quantization_config"].__setitem__(key, value))
    return export


for _bits in (2, 64, 7, 0, -4, "4"):  # 2: a 4-bit export read as 2-bit codes; the others are no bit width
    CASES[f"export_bits_{_bits}"] = (lambda env, b=_bits: env.eval_args(_edit_qc(env, "bits", b)),
                                     "but 2-bit group 32" if _bits == 2 else f"quantization_config.bits is {_bits!r}", ())


@case("group_size")
def export_group_size_string(env):
    return env.eval_args(_edit_qc(env, "group_size", "32"))


def _edit_export_tensor(env, name: str, edit) -> Path:
    export = env.export()
    env.edit_tensors(export / "model.safetensors", lambda t: edit(t, name))
    return export


Q = "model.layers.0.self_attn.q_proj"


@case("g_idx values outside")
def export_negative_g_idx(env):
    return env.eval_args(_edit_export_tensor(env, f"{Q}.g_idx", lambda t, n: t[n].__setitem__(0, -1)))


@case("g_idx values outside")
def export_g_idx_too_large(env):
    return env.eval_args(_edit_export_tensor(env, f"{Q}.g_idx", lambda t, n: t[n].__setitem__(5, 99)))


@case("NaN or Inf in the scales of model.layers.0.self_attn.q_proj")
def export_nan_scales(env):
    return env.eval_args(_edit_export_tensor(env, f"{Q}.scales", lambda t, n: t[n].__setitem__((0, 0), float("nan"))))


@case("q_proj.scales has shape [0, 64]")
def export_scales_zero_rows(env):
    return env.eval_args(_edit_export_tensor(env, f"{Q}.scales", lambda t, n: t.__setitem__(n, t[n][:0].clone())))


@case("lacks the tensor model.layers.0.self_attn.q_proj.qzeros")
def export_qzeros_missing(env):
    return env.eval_args(_edit_export_tensor(env, f"{Q}.qzeros", lambda t, n: t.pop(n)))


@case("cannot read")
def export_shard_missing(env):
    export = env.export()
    names = list(load_file(export / "model.safetensors"))
    weight_map = {n: "model.safetensors" for n in names} | {names[0]: "model-00002-of-00002.safetensors"}
    (export / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return env.eval_args(export)


@case("has tensors the model does not: evil.injected")
def export_extra_tensor(env):
    return env.eval_args(_edit_export_tensor(env, "evil.injected", lambda t, n: t.__setitem__(n, torch.zeros(2))))


@case("NaN or Inf in the embeddings")
def model_inf_embeddings(env):
    env.edit_tensors(env.model / "model.safetensors", lambda t: t["model.embed_tokens.weight"].__setitem__((3, 3), float("inf")))
    return ["quantize", env.model, env.root / "out", *RTN]


@case("NaN or Inf in the LM head")
def model_inf_lm_head(env):
    env.edit_tensors(env.model / "model.safetensors", lambda t: t["lm_head.weight"].__setitem__((3, 3), float("-inf")))
    return ["quantize", env.model, env.root / "out", *RTN]


@case("NaN or Inf in the embeddings")
def eval_inf_embeddings(env):
    env.edit_tensors(env.model / "model.safetensors", lambda t: t["model.embed_tokens.weight"].__setitem__((3, 3), float("inf")))
    return env.eval_args(env.model)


@case("lacks the tensor 'lm_head.weight'")
def eval_untied_model_without_head(env):
    env.edit_tensors(env.model / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    return env.eval_args(env.model)


# 5. bounded work before the first check


@case("larger than 1 MiB")
def calibration_above_size_cap(env):
    import quantkit.calibration

    env.monkeypatch.setattr(quantkit.calibration, "MAX_TEXT_BYTES", 2**20)
    big = env.root / "big.txt"
    big.write_text(make_text(400_000))
    return ["quantize", env.model, env.root / "out", "--calibration", big, *GPTQ]


@case("asks for 100000 decoder layers but the weights have no 'model.layers.2.*' tensors")
def config_with_100000_layers(env):
    env.edit_json(env.model / "config.json", lambda c: c.__setitem__("num_hidden_layers", 100000))
    return ["quantize", env.model, env.root / "out", *RTN]


# 6. tracebacks before: now one line


@case("cannot read")
def corrupt_safetensors(env):
    (env.model / "model.safetensors").write_bytes(os.urandom(4096))
    return ["quantize", env.model, env.root / "out", *RTN]


@case("cannot read")
def truncated_safetensors(env):
    data = (env.model / "model.safetensors").read_bytes()
    (env.model / "model.safetensors").write_bytes(data[: len(data) // 2])
    return ["quantize", env.model, env.root / "out", *RTN]


@case("cannot read")
def safetensors_header_lies(env):
    """A well-formed header whose first tensor claims bytes beyond the end of the file."""
    data = (env.model / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 2**30]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    (env.model / "model.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + n :])
    return ["eval", env.model, "--dataset", env.calib]


@case("the model config")
def config_not_json(env):
    (env.model / "config.json").write_text("{oops")
    return ["quantize", env.model, env.root / "out", *RTN]


@case("Validation error for field 'num_key_value_heads'")
def config_wrong_types(env):
    env.edit_json(env.model / "config.json", lambda c: c.__setitem__("num_key_value_heads", "two"))
    return ["quantize", env.model, env.root / "out", *RTN]


@case("but config.json implies")
def config_does_not_match_weights(env):
    env.edit_json(env.model / "config.json", lambda c: c.__setitem__("intermediate_size", 96))
    return ["quantize", env.model, env.root / "out", *RTN]


@case("model type `\\x1b[2J`")
def config_escape_sequence_in_error(env):
    env.edit_json(env.model / "config.json", lambda c: c.__setitem__("model_type", "\x1b[2J"))
    return ["quantize", env.model, env.root / "out", *RTN]


@case("cannot load the tokenizer")
def tokenizer_wrong_types(env):
    (env.model / "tokenizer.json").write_text("[]")
    return ["quantize", env.model, env.root / "out", *RTN]


@case("config_groups is malformed")
def export_config_groups_wrong_type(env):
    export = env.export()
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": []}
    env.edit_json(export / "config.json", lambda c: c.__setitem__("quantization_config", qc))
    return env.eval_args(export)


@case("is a file: pass the model's folder")
def model_is_a_file(env):
    return env.eval_args(env.calib)


@case("--max-shard-size 0")
def shard_size_zero(env):
    return ["quantize", env.model, env.root / "out", "--max-shard-size", 0, *RTN]


@case("the manifest")
def inspect_manifest_not_json(env):
    (env.export() / "quantkit.json").write_text("[1, 2")
    return ["inspect", env.export()]


@case("'recipe' is a list")
def inspect_manifest_wrong_types(env):
    env.edit_json(env.export() / "quantkit.json", lambda m: m.__setitem__("recipe", [1]))
    return ["inspect", env.export()]


@case("not a readable parquet file")
def corrupt_parquet(env):
    (env.root / "c.parquet").write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    return ["quantize", env.model, env.root / "out", "--calibration", env.root / "c.parquet", *GPTQ]


@case("not strings")
def mistyped_parquet(env):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), env.root / "c.parquet")
    return ["quantize", env.model, env.root / "out", "--calibration", env.root / "c.parquet", *GPTQ]


@case("is not a device quantkit runs on")
def device_bogus(env):
    return ["quantize", env.model, env.root / "out", "--device", "bogus", *RTN]


@case("no CUDA GPU")
def device_cuda_without_gpu(env):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    return ["eval", env.model, "--dataset", env.calib, "--device", "cuda"]


@case("--seed 1180591620717411303424")
def seed_too_large(env):
    return ["quantize", env.model, env.root / "out", "--seed", 2**70, *GPTQ, "--calibration", env.calib]


@case("--seqlen 0")
def eval_seqlen_0(env):
    return ["eval", env.model, "--dataset", env.calib, "--seqlen", 0]


@case("--seqlen 1")
def eval_seqlen_1(env):
    return ["eval", env.model, "--dataset", env.calib, "--seqlen", 1]


@case("is a file, not a folder")
def output_parent_is_a_file(env):
    (env.root / "afile").write_text("x")
    return ["quantize", env.model, env.root / "afile" / "out", *RTN]


@case("Permission denied")
def output_parent_read_only(env):
    ro = env.root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    env.cleanup.append(lambda: ro.chmod(0o755))
    if os.geteuid() == 0:  # root writes anyway: refuse creation inside ro as the kernel would for a user
        real_open, real_mkdir = os.open, os.mkdir

        def refuse(real):
            def call(path, *args, **kwargs):
                if Path(path).parent == ro:
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real(path, *args, **kwargs)

            return call

        env.monkeypatch.setattr(os, "open", refuse(real_open))
        env.monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    return ["quantize", env.model, ro / "out", *RTN]


@case("free disk space")
def disk_full_mid_export(env):
    import quantkit.export.writer as writer
    from safetensors import SafetensorError

    real, calls = writer.save_file, []

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    env.monkeypatch.setattr(writer, "save_file", fail_second)
    return ["quantize", env.model, env.root / "out", *RTN]


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_line_and_touches_nothing(name, base, tmp_path, monkeypatch):
    fn, expect, keep = CASES[name]
    env = Env(tmp_path, base, monkeypatch)
    args = fn(env)
    before = snapshot(tmp_path)
    started = time.monotonic()
    try:
        result = invoke(*args)
    finally:
        for release in env.cleanup:
            release()
    seconds = time.monotonic() - started
    line = error_line(result)
    assert expect in line, line
    assert "\x1b" not in result.output
    after = snapshot(tmp_path)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert all(p.startswith(keep) for p in changed) if keep else not changed, changed
    assert seconds < 120, f"{name} took {seconds:.0f}s before failing"


# the cases that must succeed, safely


def test_stray_safetensors_does_not_override_tensors(base, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base["model"], model)
    weights = load_file(model / "model.safetensors")
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros_like(weights["model.layers.0.self_attn.q_proj.weight"])},
              model / "zz.safetensors", metadata={"format": "pt"})
    r = invoke("quantize", model, tmp_path / "out", *RTN)
    assert r.exit_code == 0, r.output
    assert_same_tensors(tmp_path / "out" / "model.safetensors", base["export"] / "model.safetensors")


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in tb)


def _interrupted(model: Path, out: Path, monkeypatch, after_layers: int = 1) -> Path:
    """An interrupted run of ``model`` into ``out`` (Ctrl-C once ``after_layers`` are written): its partial folder."""
    from quantkit.export import Exporter

    real = Exporter.add_layer

    def interrupt(self, index, *args):
        if index == after_layers:
            raise KeyboardInterrupt
        return real(self, index, *args)

    monkeypatch.setattr(Exporter, "add_layer", interrupt)
    r = invoke("quantize", model, out, *RTN)
    assert r.exit_code == 1 and "--resume" in r.stderr
    monkeypatch.setattr(Exporter, "add_layer", real)
    return out.parent / f".{out.name}.partial"


def test_resume_trusts_only_its_own_files(base, tmp_path, monkeypatch):
    """Planted files (a link to a victim, an extra part) are dropped, the victim is untouched,
    the export equals an uninterrupted one; a changed part is refused."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    partial = _interrupted(base["model"], out, monkeypatch)
    (partial / "config.json").symlink_to(victim)
    save_file({"evil.injected": torch.zeros(2)}, partial / "part-99999.safetensors")
    (partial / "sub").mkdir()
    r = invoke("quantize", base["model"], out, "--resume", *RTN)
    assert r.exit_code == 0, r.output
    assert victim.read_text() == "precious" and not out.is_symlink()
    assert not (tmp_path / ".out.lock").exists() and not partial.exists()
    assert_same_tensors(out / "model.safetensors", base["export"] / "model.safetensors")

    partial = _interrupted(base["model"], tmp_path / "out2", monkeypatch)
    part = partial / "part-00000.safetensors"
    part.write_bytes(part.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    line = error_line(invoke("quantize", base["model"], tmp_path / "out2", "--resume", *RTN))
    assert "part-00000.safetensors is missing or changed" in line and not (tmp_path / "out2").exists()


def test_force_replaces_an_earlier_export_and_an_empty_folder(base, tmp_path):
    shutil.copytree(base["export"], tmp_path / "old")
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "old", tmp_path / "empty"):
        r = invoke("quantize", base["model"], out, "--force", *RTN)
        assert r.exit_code == 0, r.output
        assert set(json.loads((out / "quantkit.json").read_text())["files"]) | {"quantkit.json"} == {f.name for f in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old"]


def test_inspect_escapes_control_characters(base, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(base["export"], export)
    manifest = json.loads((export / "quantkit.json").read_text())
    manifest["recipe"]["method"] = "rtn\x1b]0;pwned\x07\x1b[2J"
    manifest["metrics"] = {"ppl\x1b[31m": "\x9b1m"}
    (export / "quantkit.json").write_text(json.dumps(manifest))
    r = invoke("inspect", export)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\x9b" not in r.stdout
    assert "rtn\\x1b]0;pwned\\x07\\x1b[2J" in r.stdout


def test_debug_shows_the_traceback(base, tmp_path):
    from quantkit.errors import QuantkitError

    r = invoke("--debug", "quantize", base["model"], base["model"], *RTN)
    assert r.exit_code == 1 and isinstance(r.exception, QuantkitError) and "source model folder" in str(r.exception)


def test_file_size_limit_leaves_one_line_and_no_partial_folder(base, tmp_path):
    """A real ``ulimit -f`` (the process ignores SIGXFSZ, as Python does, and gets EFBIG)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    cmd = [sys.executable, "-m", "quantkit.cli", "quantize", str(base["model"]), str(tmp_path / "out"), *RTN]
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[-1].startswith("Error: writing") and "ulimit -f" in lines[-1], lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == []
