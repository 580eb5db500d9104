"""Checks that run before torch or any model loads, so that a bad flag or input is refused in
well under a second: the recipe file, the group size against config.json, the calibration source."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from quantkit.errors import QuantkitError, read_json
from quantkit.recipe import Recipe

GROUP_SIZES = (128, 64, 32)  # the default group size is the largest of these that fits every Linear
RECIPE_FILE_EXTRAS = ("calibration", "chat_template")  # recipe-file keys that are run inputs, not Recipe fields
SMALL_CALIBRATION = 16384  # tokens; below this GPTQ/AWQ statistics are noisy (2,048 tokens lost to RTN)


def read_recipe_file(path: Path) -> dict:
    """Recipe values from a .yaml/.yml/.json file, or from an export's quantkit.json (its resolved
    recipe and calibration source), keyed by Recipe field names (dashes accepted for underscores)."""
    if not path.is_file():
        raise QuantkitError(f"--recipe '{path}' does not exist: pass a .yaml or .json recipe, or an export's quantkit.json")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise QuantkitError(f"--recipe '{path}': use a .yaml, .yml or .json file")
    try:
        data = _parse(path.read_text(encoding="utf-8", errors="replace"), suffix)
    except ValueError as e:
        raise QuantkitError(f"--recipe '{path}' does not parse ({str(e).splitlines()[0]}): fix the file") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"--recipe '{path}' must hold a mapping of recipe flags (bits: 4, group_size: 64, ...)")
    if isinstance(data.get("recipe"), dict):  # an export's manifest
        calibration = data.get("calibration") or {}
        data = {**data["recipe"], **{k: calibration[k] for k in ("source", "chat_template") if k in calibration}}
        if "source" in data:
            data["calibration"] = data.pop("source")
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(Recipe)} | set(RECIPE_FILE_EXTRAS)
    unknown = sorted(set(values) - known)
    if unknown:
        raise QuantkitError(f"--recipe '{path}': unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return values


def _parse(text: str, suffix: str):
    if suffix == ".json":
        return json.loads(text)
    import yaml  # a transformers dependency

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from None


def is_hub_id(source: str) -> bool:
    """'org/name' that is not a local path: transformers resolves it on the Hub."""
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not Path(source).exists()


def local_config(source: str) -> dict | None:
    """config.json of a local model folder (None for a hub id or a folder without one)."""
    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    return read_json(path, "the model config", "the model folder is damaged: restore config.json")


def in_features(config: dict) -> dict[str, int] | None:
    """In-features of each quantized Linear of a Llama-family decoder layer (the Adapter's Linears),
    from config.json alone; None when the config lacks the sizes."""
    try:
        hidden, heads, inter = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    except KeyError:
        return None
    attn = heads * (config.get("head_dim") or hidden // heads)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    return {**{n: hidden for n in names}, "self_attn.o_proj": attn, "mlp.down_proj": inter}


def choose_group_size(features: dict[str, int]) -> int | None:
    """The largest of 128/64/32 that divides every in-feature count (None if none does)."""
    return next((g for g in GROUP_SIZES if all(f % g == 0 for f in features.values())), None)


def check_group_size(group_size: int, features: dict[str, int]) -> None:
    if group_size == -1:
        return
    for name, f in features.items():
        if f % group_size:
            valid = [g for g in (32, 64, 128, 256) if f % g == 0] + [-1]
            raise QuantkitError(f"--group-size {group_size} does not divide layer 0 {name} (in_features {f}, from "
                                f"config.json): valid sizes {', '.join(map(str, valid))}")


def check_calibration(source: str, seqlen: int, chat_template: bool) -> None:
    """Refuse a calibration source that is missing, unreadable or shorter than one window (a token
    covers at least one byte, so fewer bytes than --seqlen + 1 cannot make a window)."""
    from quantkit.calibration import HUB_SETS, check_source, load_text, read_chats

    check_source(source)
    if source in HUB_SETS:
        return  # fetched from the hub later
    if chat_template:
        read_chats(Path(source))
        return
    size = len(load_text(source).encode())
    if size < seqlen + 1:
        raise QuantkitError(f"calibration text '{source}' has {size} bytes, fewer than one window of --seqlen {seqlen} "
                            "tokens: pass more text or a smaller --seqlen")
