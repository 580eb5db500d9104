"""User-facing errors: the CLI prints one line and exits with status 1."""

from __future__ import annotations

import errno
import json
import unicodedata
from pathlib import Path


class QuantkitError(Exception):
    """A problem with the user's input, stated with the fix."""


def escape(text: str) -> str:
    """``text`` safe for a terminal line: control and format characters (escape sequences,
    newlines, bidi overrides) become visible ``\\xNN`` / ``\\uNNNN`` escapes."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def read_json(path: Path, what: str, fix: str) -> dict:
    """The JSON object in ``path`` (a ``what`` such as 'the model config'); any read or parse
    problem, or a top level that is not an object, is a QuantkitError ending with ``fix``."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise QuantkitError(f"cannot read {what} {path} ({e.strerror or e}): {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{what} {path} is not valid JSON ({e}): {fix}") from None
    except RecursionError:
        raise QuantkitError(f"{what} {path} is nested too deeply to read: {fix}") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"{what} {path} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


_OS_FIXES = {
    errno.ENOSPC: "free disk space and retry",
    errno.EFBIG: "the file size limit (ulimit -f) is too low: raise it and retry",
    errno.EDQUOT: "the disk quota is full: free space and retry",
    errno.EACCES: "check the permissions, or choose another path",
    errno.EPERM: "check the permissions, or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "the path is a folder: pass a file",
    errno.ELOOP: "the path goes through a symbolic link, which quantkit does not follow here: pass the real path",
}


def error_line(e: BaseException) -> str:
    """One line for any exception that reached the command line: a QuantkitError as is, an
    OSError as what failed on which file and how to fix it, anything else as an internal error."""
    if isinstance(e, QuantkitError):
        return str(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        fix = _OS_FIXES.get(e.errno, "check the path and retry")
        return f"{e.strerror or e}{where}: {fix}"
    if isinstance(e, MemoryError):
        return "out of memory: use a smaller --nsamples/--seqlen, or a machine with more memory"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"internal error {type(e).__name__}: {first} (rerun with --debug for the traceback, and please report it)"
