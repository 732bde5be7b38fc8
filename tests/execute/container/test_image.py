"""The Debian mirror the runtime image is built from is read from the machine's apt sources
(real files in a temporary /etc/apt layout), never written into the code."""

import pytest

from atrund.execute.container import image


def _apt(tmp_path, **files):
    (tmp_path / "sources.list.d").mkdir()
    for name, text in files.items():
        (tmp_path / name.replace("__", "/").replace("_dot_", ".")).write_text(text)
    return tmp_path


def test_deb822_sources_with_comments_and_a_disabled_stanza(tmp_path, monkeypatch):
    monkeypatch.delenv(image.MIRROR_ENV, raising=False)
    apt = _apt(tmp_path, **{"sources.list.d__debian_dot_sources": (
        "Types: deb\n# a comment inside the stanza does not end it\nURIs: http://off.example/debian\n"
        "Suites: bookworm\nEnabled: no\n\n"
        "Types: deb\n# http://snapshot.example/archive\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n")})
    assert image.mirror(apt) == "http://mirror.example/debian"


def test_one_line_sources_with_options(tmp_path, monkeypatch):
    monkeypatch.delenv(image.MIRROR_ENV, raising=False)
    apt = _apt(tmp_path, **{"sources_dot_list": (
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://ftp.example/debian bookworm main contrib\n")})
    assert image.mirror(apt) == "http://ftp.example/debian"


def test_environment_overrides_and_no_source_is_a_clear_error(tmp_path, monkeypatch):
    apt = _apt(tmp_path, **{"sources.list.d__ubuntu_dot_sources": (
        "Types: deb\nURIs: http://archive.ubuntu.example/ubuntu\nSuites: noble\n")})
    monkeypatch.delenv(image.MIRROR_ENV, raising=False)
    with pytest.raises(image.ImageError, match=f"no Debian {image.SUITE} mirror.*{image.MIRROR_ENV}="):
        image.mirror(apt)
    monkeypatch.setenv(image.MIRROR_ENV, "http://proxy.example/debian/")
    assert image.mirror(apt) == "http://proxy.example/debian"
