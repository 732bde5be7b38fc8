"""The systemd unit (packaging/atrund.service): it parses, every key is one systemd knows, and it
carries the hardening the README promises (systemd-analyze verify, the real tool)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "atrund.service"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian: systemd)")


def _verify(unit: Path) -> str:
    """What `systemd-analyze verify` says of ``unit`` (nothing, for a good one)."""
    done = subprocess.run([ANALYZE, "verify", f"./{unit.name}"], cwd=unit.parent, capture_output=True, text=True, timeout=60)
    return (done.stdout + done.stderr).strip() + ("" if done.returncode == 0 else f"\n(exit {done.returncode})")


def _installed(tmp_path: Path, text: str) -> Path:
    """The unit as installed, with ExecStart naming this checkout's `atrund` (verify checks that
    the program exists)."""
    atrund = Path(sys.executable).with_name("atrund")
    unit = tmp_path / "atrund.service"
    unit.write_text(text.replace("/usr/local/bin/atrund", str(atrund)))
    return unit


def test_the_unit_parses_with_its_hardening(tmp_path):
    """verify has nothing to say of the unit; it starts serve (which drops to [runner] user) with
    NoNewPrivileges, a read-only system, a private /tmp, no home and a bounded capability set.
    The control: an unknown key in the same unit is reported, so silence means something."""
    text = UNIT.read_text()
    assert _verify(_installed(tmp_path, text)) == ""
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
                 "PrivateDevices=yes", "RestrictSUIDSGID=yes", "ExecStart=/usr/local/bin/atrund serve"):
        assert line in text.splitlines() or any(row.startswith(line) for row in text.splitlines()), line
    assert "CAP_SYS_ADMIN" in text and "CAP_SYS_MODULE" not in text
    bad = _installed(tmp_path, text.replace("ProtectHome=yes", "ProtectHome=yes\nProtectEverything=yes"))
    assert "Unknown key 'ProtectEverything'" in _verify(bad)


def test_the_replica_template_parses(tmp_path):
    """atrund@.service (the unit, copied) with its drop-in (packaging/atrund@.service.d/) as
    docs/scaling.md installs it: verify has nothing to say of an instance; the control: an unknown
    key in the drop-in is reported, so the drop-in was read."""
    template = _installed(tmp_path, UNIT.read_text()).rename(tmp_path / "atrund@.service")
    dropin = tmp_path / "atrund@.service.d"
    dropin.mkdir()
    text = (ROOT / "packaging" / "atrund@.service.d" / "replica.conf").read_text()
    (dropin / "replica.conf").write_text(text.replace("/usr/local/bin/atrund", str(Path(sys.executable).with_name("atrund"))))

    def verify() -> str:
        done = subprocess.run([ANALYZE, "verify", "atrund@r1.service"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, env={"SYSTEMD_UNIT_PATH": f"{template.parent}:", "PATH": "/usr/bin:/bin"})
        return (done.stdout + done.stderr).strip() + ("" if done.returncode == 0 else f"\n(exit {done.returncode})")

    assert verify() == ""
    (dropin / "replica.conf").write_text(text + "ProtectEverything=yes\n")
    assert "Unknown key 'ProtectEverything'" in verify()
