"""Config: defaults, TOML, GATEWAY_* overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import DEFAULT_UID_ROOT, ENV_KEYS, Rule, from_mapping, load_config
from service.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_env() -> None:
    config = load_config(None, environ={})
    assert config.input_dir == Path("INPUT")
    assert config.defaults.stable_seconds == 10.0
    assert config.defaults.max_wait_seconds == 600.0
    assert config.defaults.layout == "study"
    assert config.uid_root == DEFAULT_UID_ROOT
    assert config.watch == "native" and config.rescan_seconds == 30.0
    assert not config.pacs.enabled
    assert config.defaults.rules == (Rule(model="cxr-densenet121", modality=("CR", "DX")),)


def test_workers_auto_is_one_per_core_at_least_1_at_most_8(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts = {1: 1, 2: 2, 6: 6, 64: 8}  # at least one: the run bounds need a worker
    for cores, workers in counts.items():
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert load_config(None, environ={}).workers == workers
        assert load_config(None, environ={"GATEWAY_WORKERS": "auto"}).workers == workers
    assert load_config(None, environ={"GATEWAY_WORKERS": "3"}).workers == 3
    config = from_mapping({"service": {"max_batch": 32, "batch_wait_seconds": 0.5}})
    assert (config.max_batch, config.batch_wait_seconds) == (32, 0.5)


def test_toml_and_per_gateway_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[service]
input_dir = "/data/in"
uid_root = "1.2.3.4"
[defaults]
stable_seconds = 5
[pacs]
host = "pacs.local"
port = 11112
[gateways.7]
layout = "flat"
rules = [{model = "annotate", modality = ["ct"]}]
pacs = {host = "other", ae_title = "SITE7"}
""",
    )
    config = load_config(path, environ={})
    assert config.input_dir == Path("/data/in")
    assert config.uid_root == "1.2.3.4."
    assert config.gateway("7").layout == "flat"
    assert config.gateway("7").stable_seconds == 5.0  # inherited from [defaults]
    assert config.gateway("7").rules == (Rule(model="annotate", modality=("CT",)),)
    assert config.gateway("1").layout == "study"
    assert config.destination("7").host == "other" and config.destination("7").ae_title == "SITE7"
    assert config.destination("1").host == "pacs.local" and config.destination("1").port == 11112


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[defaults]\nstable_seconds = 5\n")
    env = {
        "GATEWAY_INPUT_DIR": "/mnt/in",
        "GATEWAY_OUTPUT_DIR": "/mnt/out",
        "GATEWAY_STATE_DIR": "/mnt/state",
        "GATEWAY_STABLE_SECONDS": "2.5",
        "GATEWAY_UID_ROOT": "1.2.826.0.1.3680043.10.1234.",
        "GATEWAY_PACS_HOST": "orthanc",
        "GATEWAY_PACS_PORT": "4242",
    }
    config = load_config(path, environ=env)
    assert config.output_dir == Path("/mnt/out") and config.state_dir == Path("/mnt/state")
    assert config.defaults.stable_seconds == 2.5
    assert config.uid_root == "1.2.826.0.1.3680043.10.1234."
    assert config.destination("any").port == 4242


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"GATEWAY_STABLE_SECONDS": "soon"}, "defaults.stable_seconds"),
        ({"GATEWAY_STABLE_SECONDS": "-1"}, "defaults.stable_seconds"),
        ({"GATEWAY_PACS_PORT": "70000"}, "pacs.port"),
        ({"GATEWAY_UID_ROOT": "1.2.abc"}, "service.uid_root"),
        ({"GATEWAY_UID_ROOT": "1." * 30}, "service.uid_root"),
        ({"GATEWAY_WATCH": "inotify"}, "service.watch"),
        ({"GATEWAY_PACS_AE_TITLE": "A" * 17}, "pacs.ae_title"),
        ({"GATEWAY_CXR_DEVICE": "tpu"}, "models.cxr.device"),
        ({"GATEWAY_CXR_SHA256": "abc"}, "models.cxr.sha256"),
        ({"GATEWAY_TYPO": "1"}, "GATEWAY_TYPO"),
        ({"GATEWAY_WORKERS": "many"}, "service.workers"),
        ({"GATEWAY_WORKERS": "-1"}, "service.workers"),
    ],
)
def test_bad_environment_value_names_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, environ=env)
    assert err.value.key == key
    assert key in str(err.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"service": {"inptu_dir": "x"}}, "service.inptu_dir"),
        ({"gateways": {"1": {"layout": "tree"}}}, "gateways.1.layout"),
        ({"gateways": {"a/b": {}}}, "gateways.a/b"),
        ({"defaults": {"rules": [{"modality": ["CR"]}]}}, "defaults.rules[0].model"),
        ({"defaults": {"rules": [{"model": "x", "colour": "red"}]}}, "defaults.rules[0].colour"),
        ({"extra": {}}, "extra"),
        ({"service": {"max_batch": 0}}, "service.max_batch"),
        ({"service": {"max_elements": 0}}, "service.max_elements"),
        ({"service": {"worker_memory_mb": 10}}, "service.worker_memory_mb"),
        ({"service": {"run_timeout_seconds": -1}}, "service.run_timeout_seconds"),
        ({"service": {"batch_wait_seconds": -0.1}}, "service.batch_wait_seconds"),
        ({"pacs": {"max_associations": 0}}, "pacs.max_associations"),
        ({"pacs": {"max_associations": "four"}}, "pacs.max_associations"),
        (
            {"gateways": {"7": {"pacs": {"max_associations": -1}}}},
            "gateways.7.pacs.max_associations",
        ),
    ],
)
def test_bad_toml_names_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(data)
    assert err.value.key == key


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[service\n"), environ={})


def test_env_keys_documented_in_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [var for var in ENV_KEYS if var not in readme]
    assert not missing, f"README does not document {missing}"


def test_max_associations_default_toml_and_per_gateway() -> None:
    """[pacs] max_associations (default 4) and a gateway's own pacs table; errors name it."""
    assert from_mapping({}).pacs.max_associations == 4
    config = from_mapping(
        {
            "pacs": {"host": "pacs.local", "max_associations": 2},
            "gateways": {"7": {"pacs": {"host": "pacs7", "max_associations": 1}}},
        }
    )
    assert config.pacs.max_associations == 2
    assert config.destination("7").max_associations == 1
    assert config.destination("other").max_associations == 2
    with pytest.raises(ConfigError, match=r"pacs\.max_associations.*must be >= 1"):
        from_mapping({"pacs": {"max_associations": 0}})


def test_node_name_defaults_to_the_host_name_and_is_validated(tmp_path: Path) -> None:
    import socket

    assert load_config(None, environ={}).node_name == socket.gethostname()
    path = write(tmp_path, '[service]\nnode_name = "edge-7"\n')
    assert load_config(path, environ={}).node_name == "edge-7"
    assert load_config(path, environ={"GATEWAY_NODE_NAME": "edge-8"}).node_name == "edge-8"
    assert load_config(None, environ={"GATEWAY_NODE_NAME": ""}).node_name == socket.gethostname()
    for bad in ("two words", 7, "x" * 129, "tab\there"):
        with pytest.raises(ConfigError) as err:
            from_mapping({"service": {"node_name": bad}})
        assert "service.node_name" in str(err.value)
