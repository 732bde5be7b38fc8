"""The demo's and setup's own options: --help answers without setting anything up."""

import subprocess
import sys
import time

from conftest import ROOT


def test_demo_and_setup_help_install_nothing():
    for argv in (["bash", "scripts/demo", "--help"], ["bash", "scripts/setup", "-h"],
                 [sys.executable, "-m", "atrund.dev.demo", "--help"]):
        started = time.monotonic()
        p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert p.returncode == 0, p.stderr
        assert "usage" in p.stdout.lower() and "[setup]" not in p.stdout + p.stderr, p.stdout + p.stderr
        assert time.monotonic() - started < 10
    p = subprocess.run(["bash", "scripts/setup", "--nope"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert p.returncode == 2 and "unknown option --nope" in p.stderr
