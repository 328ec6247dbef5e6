import os

import pytest

from vibatch import config
from vibatch.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text):
    p = tmp_path / "vibatch.yaml"
    p.write_text(text)
    return str(p)


def test_example_config_is_valid_and_complete():
    cfg = config.load(os.path.join(REPO, "etc", "vibatch.yaml"))
    assert cfg.libvirt_uri == "qemu:///system"
    assert cfg.vm.acceleration == "auto"
    assert cfg.exec.env_exclude == tuple(config.DEFAULT_ENV_EXCLUDE)


def test_empty_file_gives_defaults(tmp_path):
    cfg = config.load(write(tmp_path, ""))
    assert cfg.jobs.default_cores == 1 and cfg.state_dir == "/var/lib/vibatch"


@pytest.mark.parametrize("text, key, reason", [
    ("bogus: 1\n", "bogus", "unknown key"),
    ("vm:\n  boot_timeout: 5\n", "vm.boot_timeout", "unknown key"),
    ("vm:\n  boot_timeout_s: soon\n", "vm.boot_timeout_s", "expected float, got str"),
    ("vm:\n  boot_timeout_s: 0\n", "vm.boot_timeout_s", "between 1 and 3600"),
    ("vm:\n  acceleration: hvf\n", "vm.acceleration", "must be auto, kvm or tcg"),
    ("jobs:\n  default_cores: true\n", "jobs.default_cores", "expected int, got bool"),
    ("jobs:\n  default_cores: 0\n", "jobs.default_cores", "greater than 0"),
    ("state_dir: relative/path\n", "state_dir", "absolute path"),
    ("host:\n  reserved_cpus: [a]\n", "host.reserved_cpus", "list of CPU ids"),
    ("host: 3\n", "host", "expected a mapping"),
    ("jobs:\n  default_cores: 4\n  max_cores: 2\n", "jobs.default_cores", "more than jobs.max_cores"),
])
def test_bad_values_name_file_key_and_reason(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    msg = str(e.value)
    assert msg.startswith(path + ": ") and f" {key}: " in f" {msg.split(': ', 1)[1]}" and reason in msg


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        config.load(write(tmp_path, "- a\n- b\n"))


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"vibatch.yaml: line 2: not valid YAML"):
        config.load(write(tmp_path, "a: 1\nb: c: d\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        config.load(str(tmp_path / "nope.yaml"))


def test_env_var_selects_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VIBATCH_CONFIG", write(tmp_path, "images:\n  default: alma9\n"))
    assert config.load().images.default == "alma9"


def test_int_accepted_for_float():
    cfg = config.parse({"vm": {"boot_timeout_s": 5}}, "x")
    assert cfg.vm.boot_timeout_s == 5.0 and isinstance(cfg.vm.boot_timeout_s, float)
