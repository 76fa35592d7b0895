"""Building the extension where OpenSSL's headers are missing says what to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    os.geteuid() != 0
    or shutil.which("unshare") is None
    or not Path("/usr/include/openssl").is_dir(),
    reason="hides /usr/include/openssl in a private mount namespace: needs root and unshare",
)
def test_build_without_openssl_headers_names_the_package(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.so", "*.c"))
    hide_and_build = (
        "mount -t tmpfs none /usr/include/openssl && "
        f"{sys.executable} setup.py -q build_ext --inplace"
    )
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", hide_and_build],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if "mount:" in out.stderr and "permission denied" in out.stderr.lower():
        pytest.skip("this sandbox does not allow a private mount")
    assert out.returncode != 0
    assert "apt-get install libssl-dev" in out.stderr
    assert "Traceback" not in out.stderr
