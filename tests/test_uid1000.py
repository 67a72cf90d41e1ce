"""The hostile payload suite again, as uid 1000 (as on a Hugging Face Space)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "payloads-as-uid1000"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid 1000 needs root")
@pytest.mark.skipif(
    shutil.which("setpriv") is None or shutil.which("uv") is None, reason="needs setpriv and uv"
)
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs /usr/bin/python3")
def test_payload_suite_as_uid_1000():
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=1500)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
