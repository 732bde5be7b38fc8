"""Configuration errors name the TOML key; defaults are what the README says."""

from pathlib import Path

import pytest

from atrund import config

MINIMAL = '[runner]\npds = "http://localhost:2583"\nidentifier = "runner.test"\n'


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = config.load(write(tmp_path, MINIMAL))
    assert cfg.access.mode == "allowlist" and cfg.access.allowlist == []
    assert cfg.executor.isolation == "auto" and cfg.executor.default_timeout == 30 and cfg.executor.max_timeout == 300
    assert cfg.ingest.poll_interval == 2.0
    assert cfg.state.dir == tmp_path / "atrund-state"  # relative to the config file
    g = cfg.gateway
    assert g.enabled and (g.host, g.port) == ("127.0.0.1", 8080) and g.public_url is None  # loopback unless asked
    assert (g.rate_per_minute, g.burst, g.max_body_bytes, g.timeout) == (600.0, 60, 1_048_576, 10)


@pytest.mark.parametrize(
    "extra, key",
    [
        ('[access]\nmode = "friends"\n', "access.mode"),
        ('[access]\nallowlist = ["alice"]\n', "access"),
        ('[executor]\nconcurency = 3\n', "executor.concurency"),
        ('[executor]\nmax_timeout = 0\n', "executor.max_timeout"),
        ('[ingest]\npoll_interval = "soon"\n', "ingest.poll_interval"),
        ('[gateway]\nlisten = "8080"\n', "gateway.listen"),
        ('[gateway]\nlisten = "0.0.0.0:99999"\n', "gateway.listen"),
        ('[gateway]\nrate_per_minute = 0\n', "gateway.rate_per_minute"),
        ('[gateway]\nport = 80\n', "gateway.port"),
        ('[permissions]\nnet_private = ["10.0.0.0/33"]\n', "permissions.net_private"),
    ],
)
def test_errors_name_the_key(tmp_path, extra, key):
    with pytest.raises(config.ConfigError) as e:
        config.load(write(tmp_path, MINIMAL + extra))
    assert str(e.value).startswith(key), str(e.value)


def test_missing_runner_section(tmp_path):
    with pytest.raises(config.ConfigError, match="^runner: required key is missing"):
        config.load(write(tmp_path, "[access]\nmode = 'open'\n"))


def test_bad_toml_names_the_file(tmp_path):
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[runner\n"))


def test_password_comes_from_the_environment_never_the_file(tmp_path, monkeypatch):
    cfg = config.load(write(tmp_path, MINIMAL))
    monkeypatch.delenv("ATRUND_APP_PASSWORD", raising=False)
    with pytest.raises(config.ConfigError, match="runner.password_env: environment variable ATRUND_APP_PASSWORD"):
        cfg.runner.password()
    monkeypatch.setenv("ATRUND_APP_PASSWORD", "abcd-efgh")
    assert cfg.runner.password() == "abcd-efgh"
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.load(write(tmp_path, MINIMAL + 'password = "x"\n'))


def test_password_file(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    cfg = config.load(write(tmp_path, MINIMAL + f'password_file = "{tmp_path / "pw"}"\n'))
    assert cfg.runner.password() == "from-file"


def test_example_config_is_valid():
    config.load(Path(__file__).resolve().parent.parent / "config.toml.example")


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("secret")
    monkeypatch.chdir("/")
    cfg = config.load(write(tmp_path, MINIMAL + 'password_file = "pw"\n[state]\ndir = "st"\n'))
    assert cfg.runner.password() == "secret" and cfg.state.dir == tmp_path / "st"


def test_per_backend_settings_live_in_their_sections(tmp_path):
    """[executor.process], [executor.container] and [executor.microvm] hold each backend's own
    settings; relative guest paths are relative to the config file, as every path is."""
    cfg = config.load(write(tmp_path, MINIMAL + '[executor]\nisolation = "container"\n'
                            '[executor.process]\nuids = 8\n'
                            '[executor.container]\nimage = "mine:1"\nruntime = "runsc"\n'
                            '[executor.microvm]\nkernel = "vm/vmlinux"\nmonitor = "qemu"\n'))
    e = cfg.executor
    assert (e.isolation, e.process.uids, e.container.image, e.container.runtime) == ("container", 8, "mine:1", "runsc")
    assert e.microvm.kernel == tmp_path / "vm" / "vmlinux" and e.microvm.monitor == "qemu" and cfg.warnings == []
    with pytest.raises(config.ConfigError, match=r"^executor\.container\.imag: unknown key"):
        config.load(write(tmp_path, MINIMAL + '[executor.container]\nimag = "x"\n'))


def test_a_moved_key_still_loads_and_check_config_says_where_it_lives_now(tmp_path):
    """An old flat [executor] key loads into its section; `atrund check-config` names it and its
    new place on stderr, one line each, and still says ok."""
    import subprocess
    import sys

    path = write(tmp_path, MINIMAL + '[executor]\nimage = "mine:1"\nvm_kernel = "vm/vmlinux"\nsandbox_uids = 8\n')
    cfg = config.load(path)
    assert cfg.executor.container.image == "mine:1" and cfg.executor.microvm.kernel == tmp_path / "vm" / "vmlinux"
    assert cfg.executor.process.uids == 8
    assert [w.split(":")[0] for w in cfg.warnings] == ["executor.sandbox_uids", "executor.image", "executor.vm_kernel"]
    p = subprocess.run([sys.executable, "-m", "atrund.cli", "check-config", "-c", str(path)], capture_output=True, text=True,
                       timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert p.returncode == 0 and "ok" in p.stderr, p.stderr
    for old, new in [("image", "container.image"), ("vm_kernel", "microvm.kernel"), ("sandbox_uids", "process.uids")]:
        assert f"executor.{old}: moved to executor.{new}" in p.stderr, p.stderr
    with pytest.raises(config.ConfigError, match=r"^executor: image and container\.image are both set: keep only container\.image"):
        config.load(write(tmp_path, MINIMAL + '[executor]\nimage = "a"\n[executor.container]\nimage = "b"\n'))


def test_isolation_names_come_from_the_registry_and_firecracker_is_microvm(tmp_path):
    """Every backend of the registry is a valid isolation; the old name firecracker loads as
    microvm; anything else names the choices."""
    from atrund.execute import BACKENDS

    for name in ("auto", *BACKENDS):
        assert config.load(write(tmp_path, MINIMAL + f'[executor]\nisolation = "{name}"\n')).executor.isolation == name
    old = config.load(write(tmp_path, MINIMAL + '[executor]\nisolation = "firecracker"\n'))
    assert old.executor.isolation == "microvm"
    assert old.warnings == ["executor.isolation: 'firecracker' is the old name of 'microvm'; it still works"]
    with pytest.raises(config.ConfigError, match=r"^executor\.isolation: 'vmware' is not a backend \(available: microvm, "
                                                 r"process, container, none, auto; firecracker is the old name of microvm\)"):
        config.load(write(tmp_path, MINIMAL + '[executor]\nisolation = "vmware"\n'))


def test_a_url_without_its_scheme_is_refused_by_name(tmp_path):
    """A PDS, PLC, firehose or public URL without its scheme (the common slip) is a configuration
    error naming the key and the likely fix, not an 'unreachable' at start."""
    cases = [(MINIMAL.replace("http://localhost:2583", "localhost:2583"), r"runner\.pds: .*'localhost:2583' is not a http:// or "
              r"https:// URL \(did you mean https://localhost:2583\?\)"),
             (MINIMAL + '[identity]\nplc_url = "plc.example"\n', r"identity\.plc_url: .*did you mean https://plc\.example"),
             (MINIMAL + '[ingest]\nfirehose_url = "https://relay.example"\n', r"ingest\.firehose_url: .*not a ws:// or wss:// URL"),
             (MINIMAL + '[gateway]\npublic_url = "runner.example"\n', r"gateway\.public_url: .*did you mean https://runner\.example")]
    for text, message in cases:
        with pytest.raises(config.ConfigError, match=message):
            config.load(write(tmp_path, text))
    assert config.load(write(tmp_path, MINIMAL + '[ingest]\nfirehose_url = "wss://relay.example"\n')).ingest.firehose_url


def test_bundle_state_quotas_default_as_documented_and_values_fit_the_channel(tmp_path):
    q = config.load(write(tmp_path, MINIMAL)).bundle_state
    assert (q.max_keys, q.max_value_bytes, q.max_bytes, q.max_ops_per_run) == (10_000, 16_384, 10_485_760, 1_000)
    with pytest.raises(config.ConfigError, match=r"bundle_state\.max_value_bytes \(70000\) must leave room for the call in "
                                                 r"executor\.max_output_bytes: at most 63488"):
        config.load(write(tmp_path, MINIMAL + "[bundle_state]\nmax_value_bytes = 70000\n"))
