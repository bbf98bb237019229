"""Config: defaults, TOML, GATEWAY_* overrides, and errors that name the bad key."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest

from service.config import (
    DEFAULT_UID_ROOT,
    ENV_KEYS,
    MASK,
    PacsConfig,
    Rule,
    effective_settings,
    from_mapping,
    load_config,
)
from service.errors import ConfigError
from tests.test_sender_tls import make_pki, openssl

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


@pytest.mark.parametrize("runtime", ["auto", "onnxruntime", "torch"])
def test_cxr_runtime_from_the_environment(runtime: str) -> None:
    config = load_config(None, environ={"GATEWAY_CXR_RUNTIME": runtime})
    assert config.cxr.runtime == runtime


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
        ({"GATEWAY_CXR_RUNTIME": "tensorrt"}, "models.cxr.runtime"),
        (
            {"GATEWAY_CXR_RUNTIME": "onnxruntime", "GATEWAY_CXR_DEVICE": "cuda"},
            "models.cxr.runtime",
        ),
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
    from service.config import NOT_CONFIG_ENV  # known, so never warned about: documented too

    missing = [var for var in [*ENV_KEYS, *NOT_CONFIG_ENV] if var not in readme]
    assert not missing, f"README does not document {missing}"


def readme_config_block() -> dict[str, Any]:
    """The TOML example of README's Configuration section, parsed."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```toml\n", 1)[1].split("```", 1)[0]
    return tomllib.loads(block)


def test_every_toml_key_of_the_dataclasses_is_in_the_readme_block() -> None:
    """Only documented keys exist: each field of each config dataclass is a key of the
    README's example, in its table, and the example itself loads."""
    from service.config import NOT_SERVICE_KEYS, Config, CxrConfig, GatewayConfig

    block = readme_config_block()
    gateway_keys = set(block["defaults"]) | set(block["gateways"]["7"])
    rules = block["defaults"]["rules"] + block["gateways"]["7"]["rules"]
    tables: list[tuple[str, type, set[str]]] = [
        ("service", Config, set(block["service"])),
        ("defaults / gateways.7", GatewayConfig, gateway_keys),
        ("pacs", PacsConfig, set(block["pacs"])),
        ("models.cxr", CxrConfig, set(block["models"]["cxr"])),
        ("rules", Rule, {key for rule in rules for key in rule}),
    ]
    missing = [
        f"{table}.{f.name}"
        for table, cls, keys in tables
        for f in dataclasses.fields(cls)
        if f.name not in keys and not (cls is Config and f.name in NOT_SERVICE_KEYS)
    ]
    assert not missing, f"README's Configuration block does not show {missing}"
    config = from_mapping(block)
    assert config.destination("7").host == "pacs7.example"


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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a client certificate with its key; ``other.key``: a key of another pair;
    ``encrypted.key``: the client key under a passphrase; ``junk.pem``: not PEM."""
    folder = tmp_path_factory.mktemp("tls")
    files = make_pki(folder / "site", "site")
    other = make_pki(folder / "other", "other")
    openssl("rsa", "-in", str(files["client.key"]), "-aes256", "-passout", "pass:secret",
            "-out", "encrypted.key", cwd=folder)  # fmt: skip
    (folder / "junk.pem").write_text("not a certificate\n")
    (folder / "pacs-password").write_text("file-Pa55\n")
    return {
        **files,
        "other.key": other["client.key"],
        "encrypted.key": folder / "encrypted.key",
        "junk.pem": folder / "junk.pem",
        "pacs-password": folder / "pacs-password",
    }


def non_default_pacs(pki: dict[str, Path]) -> dict[str, Any]:
    """A value other than the default for every PacsConfig field (a new field must be added
    here, so that its inheritance is tested)."""
    values: dict[str, Any] = {
        "host": "pacs.example",
        "port": 11112,
        "ae_title": "SITEPACS",
        "calling_ae_title": "HOSP_AI",
        "timeout_seconds": 5.0,
        "max_associations": 2,
        "tls_ca": str(pki["ca.pem"]),
        "tls_cert": str(pki["client.pem"]),
        "tls_key": str(pki["client.key"]),
        "url": "http://web.example:8042/dicom-web",
        "username": "gateway",
        "password": "pw",
        "password_file": str(pki["pacs-password"]),
        "token": "tok",
    }
    assert set(values) == {f.name for f in dataclasses.fields(PacsConfig)}
    return values


#: DICOMweb-only keys, and what each needs beside it in a valid table.
WEB_COMPANIONS: dict[str, tuple[str, ...]] = {
    "url": (),
    "username": ("url", "password"),
    "password": ("url", "username"),
    "password_file": ("url", "username"),
    "token": ("url",),
}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(PacsConfig)])
def test_gateway_destination_inherits_each_unset_pacs_field(
    name: str, pki: dict[str, Path]
) -> None:
    """[gateways.<id>] pacs = {...} takes every key it does not set from [pacs]."""
    values = non_default_pacs(pki)
    pacs: dict[str, Any] = {name: values[name]}
    if name in ("tls_cert", "tls_key"):  # one is refused without the other
        pacs = {"tls_cert": values["tls_cert"], "tls_key": values["tls_key"]}
    own: dict[str, Any] = {"port": 4242} if name == "host" else {"host": "pacs7.example"}
    if name in WEB_COMPANIONS:  # a DICOMweb [pacs]; the gateway sets a shared key only
        pacs.update({k: values[k] for k in WEB_COMPANIONS[name]})
        own = {"max_associations": 3}
    config = from_mapping({"pacs": pacs, "gateways": {"7": {"pacs": own}}})
    destination = config.destination("7")
    assert getattr(destination, name) == values[name]
    for key, value in own.items():  # and what it sets wins
        assert getattr(destination, key) == value
    assert getattr(config.destination("other"), name) == values[name]


def test_gateway_destination_keeps_tls_calling_ae_and_timeout_of_pacs(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The case found: a gateway naming only host and port went out without TLS, with the
    default calling AE and timeout. The environment's [pacs] values are inherited too."""
    path = write(
        tmp_path,
        f"""
[pacs]
tls_ca = "{pki["ca.pem"]}"
calling_ae_title = "HOSP_AI"
timeout_seconds = 5
[gateways.7]
pacs = {{ host = "pacs7.example", port = 11112 }}
""",
    )
    config = load_config(path, environ={"GATEWAY_PACS_AE_TITLE": "ENVPACS"})
    destination = config.destination("7")
    assert (destination.host, destination.port) == ("pacs7.example", 11112)
    assert destination.tls_ca == str(pki["ca.pem"])
    assert destination.calling_ae_title == "HOSP_AI"
    assert destination.timeout_seconds == 5.0
    assert destination.ae_title == "ENVPACS"


@pytest.mark.parametrize(
    ("pacs", "own", "key"),
    [
        ({"tls_ca": "missing.pem"}, None, "pacs.tls_ca"),
        ({"tls_ca": "junk.pem"}, None, "pacs.tls_ca"),
        ({"tls_ca": "ca.pem", "tls_cert": "client.pem"}, None, "pacs.tls_key"),
        ({"tls_key": "client.key"}, None, "pacs.tls_cert"),
        ({"tls_cert": "junk.pem", "tls_key": "client.key"}, None, "pacs.tls_cert"),
        ({"tls_cert": "client.pem", "tls_key": "other.key"}, None, "pacs.tls_key"),
        ({"tls_cert": "client.pem", "tls_key": "encrypted.key"}, None, "pacs.tls_key"),
        ({"tls_cert": "client.pem", "tls_key": "missing.key"}, None, "pacs.tls_key"),
        ({}, {"tls_ca": "missing.pem"}, "gateways.7.pacs.tls_ca"),
        ({}, {"tls_cert": "client.pem"}, "gateways.7.pacs.tls_key"),
        (
            {"tls_cert": "client.pem", "tls_key": "client.key"},
            {"tls_key": "other.key"},
            "gateways.7.pacs.tls_key",
        ),
    ],
)
def test_tls_that_cannot_be_applied_is_refused_naming_the_key(
    pacs: dict[str, str], own: dict[str, str] | None, key: str, pki: dict[str, Path]
) -> None:
    def files(table: dict[str, str]) -> dict[str, str]:
        folder = pki["ca.pem"].parent
        return {k: str(pki.get(v, folder / v)) for k, v in table.items()}

    data: dict[str, Any] = {"pacs": files(pacs)}
    if own is not None:
        data["gateways"] = {"7": {"pacs": {"host": "pacs7", **files(own)}}}
    with pytest.raises(ConfigError) as err:
        from_mapping(data)
    assert err.value.key == key
    assert "secret" not in str(err.value)


def test_defaults_pacs_is_refused_so_the_environment_always_wins() -> None:
    """[defaults] pacs would have overridden GATEWAY_PACS_HOST: the default destination is
    [pacs] only, and the environment wins over it."""
    with pytest.raises(ConfigError) as err:
        from_mapping({"defaults": {"pacs": {"host": "file-pacs"}}})
    assert err.value.key == "defaults.pacs"
    config = from_mapping({"pacs": {"host": "file-pacs"}})
    assert config.destination("1").host == "file-pacs"


def test_relative_paths_in_a_file_resolve_from_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pki: dict[str, Path]
) -> None:
    """Run from another folder, the file's relative paths are still the file's; the default
    folders too when a file is given. Environment values keep the current directory."""
    folder = tmp_path / "etc"
    folder.mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        shutil.copy(pki[name], folder / name)
    path = folder / "gateway.toml"
    path.write_text(
        """
[service]
input_dir = "in"
state_dir = "../state"
[models.cxr]
weights = "weights/cxr.pt"
[pacs]
tls_ca = "ca.pem"
[gateways.7]
pacs = { host = "pacs7", tls_cert = "client.pem", tls_key = "client.key" }
"""
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path, environ={})
    assert config.input_dir == folder / "in"
    assert config.state_dir == tmp_path / "state"
    assert config.output_dir == folder / "OUTPUT"  # a default, from the file's folder
    assert config.cxr.weights == str(folder / "weights" / "cxr.pt")
    assert config.pacs.tls_ca == str(folder / "ca.pem")
    assert config.destination("7").tls_ca == str(folder / "ca.pem")
    assert config.destination("7").tls_cert == str(folder / "client.pem")
    assert config.destination("7").tls_key == str(folder / "client.key")
    env = load_config(path, environ={"GATEWAY_INPUT_DIR": "mnt/in", "GATEWAY_CXR_WEIGHTS": ""})
    assert env.input_dir == Path("mnt/in")  # from the current directory
    assert env.cxr.weights == ""  # "" keeps its meaning: torchxrayvision's cache
    assert load_config(None, environ={}).input_dir == Path("INPUT")


def test_unknown_gateway_variables_warn_naming_them_and_do_not_stop() -> None:
    env = {"GATEWAY_PORT": "8080", "GATEWAY_TOKEN_X": "s3cr3t", "GATEWAY_FAILPOINTS": ""}
    config = load_config(None, environ=env)
    assert len(config.warnings) == 1
    assert "GATEWAY_PORT" in config.warnings[0] and "GATEWAY_TOKEN_X" in config.warnings[0]
    assert "GATEWAY_FAILPOINTS" not in config.warnings[0]  # read by service/failpoints.py
    assert "8080" not in config.warnings[0] and "s3cr3t" not in config.warnings[0]
    assert load_config(None, environ={"GATEWAY_FAILPOINTS": ""}).warnings == ()


def test_effective_settings_name_each_source_and_inheritance(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    from service.config import effective_settings, render_settings

    path = write(
        tmp_path,
        f"""
[service]
input_dir = "in"
[defaults]
layout = "flat"
[pacs]
host = "pacs.example"
tls_ca = "{pki["ca.pem"]}"
[gateways.7]
stable_seconds = 5
pacs = {{ host = "pacs7.example" }}
""",
    )
    env = {"GATEWAY_PACS_CALLING_AE_TITLE": "HOSP_AI", "GATEWAY_PORT": "1"}
    settings = effective_settings(load_config(path, environ=env), ["2"])
    assert settings["config_file"] == str(path)
    assert settings["service"]["input_dir"] == {
        "value": str(tmp_path / "in"),
        "source": "file",
        "from": "service.input_dir",
    }
    assert settings["service"]["state_dir"]["source"] == "default"
    assert list(settings["gateways"]) == ["2", "7", "*"]
    seven = settings["gateways"]["7"]
    assert seven["stable_seconds"] == {
        "value": 5.0,
        "source": "file",
        "from": "gateways.7.stable_seconds",
    }
    assert seven["layout"]["from"] == "defaults.layout"
    assert seven["max_wait_seconds"] == {"value": 600.0, "source": "default", "from": ""}
    assert seven["pacs"]["host"]["from"] == "gateways.7.pacs.host"
    assert seven["pacs"]["tls_ca"] == {
        "value": str(pki["ca.pem"]),
        "source": "file",
        "from": "pacs.tls_ca",
    }
    assert seven["pacs"]["calling_ae_title"] == {
        "value": "HOSP_AI",
        "source": "env",
        "from": "GATEWAY_PACS_CALLING_AE_TITLE",
    }
    assert settings["gateways"]["2"]["pacs"]["host"]["value"] == "pacs.example"
    assert settings["gateways"]["*"]["layout"]["value"] == "flat"
    assert "GATEWAY_PORT" in settings["warnings"][0]
    text = render_settings(settings)
    assert "\n[gateways.7]\n" in text
    assert f'pacs.tls_ca = "{pki["ca.pem"]}"' in text
    line = next(x for x in text.splitlines() if x.startswith("pacs.calling_ae_title"))
    assert line.endswith("# env GATEWAY_PACS_CALLING_AE_TITLE")


def test_effective_settings_mask_secret_named_keys() -> None:
    """Any key named *password*, *token* or *secret* is masked, whatever its value."""
    from service.config import MASK, effective_settings, render_settings

    fields = [("password", str, ""), ("api_token", str, ""), ("client_secret", str, "")]
    with_secrets = dataclasses.make_dataclass(
        "SecretPacs", fields, bases=(PacsConfig,), frozen=True
    )
    pacs = with_secrets(host="pacs", password="hunter2", api_token="tok3n", client_secret="v4lu3")
    config = dataclasses.replace(from_mapping({}), pacs=pacs)
    settings = effective_settings(config)
    shown = settings["gateways"]["*"]["pacs"]
    assert shown["password"]["value"] == shown["api_token"]["value"] == MASK
    assert shown["client_secret"]["value"] == MASK and shown["host"]["value"] == "pacs"
    for text in (render_settings(settings), str(settings)):
        assert "hunter2" not in text and "tok3n" not in text and "v4lu3" not in text


def test_url_makes_a_dicomweb_destination_from_file_and_env(tmp_path: Path) -> None:
    environ = {
        "GATEWAY_PACS_URL": "http://127.0.0.1:8042/dicom-web/",
        "GATEWAY_PACS_USERNAME": "gateway",
        "GATEWAY_PACS_PASSWORD": "s3cret",
    }
    config = load_config(environ=environ)
    destination = config.destination("any")
    assert destination.dicomweb and destination.enabled
    assert destination.url == "http://127.0.0.1:8042/dicom-web"  # trailing / dropped
    assert (destination.username, destination.password) == ("gateway", "s3cret")
    shown = effective_settings(config)["gateways"]["*"]["pacs"]
    assert shown["password"] == {"value": MASK, "source": "env", "from": "GATEWAY_PACS_PASSWORD"}
    assert shown["url"]["value"] == "http://127.0.0.1:8042/dicom-web"
    assert not PacsConfig().dicomweb and not PacsConfig().enabled


def test_a_gateway_of_the_other_kind_inherits_nothing_kind_specific() -> None:
    dimse = {"host": "pacs.example", "port": 11112, "ae_title": "SITEPACS", "timeout_seconds": 5}
    web = {"url": "https://web.example/dicom-web", "token": "tok", "timeout_seconds": 6}
    config = from_mapping(
        {
            "pacs": dimse,
            "gateways": {
                "7": {"pacs": {"url": "http://web7.example/dw", "username": "u", "password": "p"}}
            },
        }
    )
    destination = config.destination("7")
    assert destination.dicomweb
    assert (destination.host, destination.port, destination.ae_title) == ("", 104, "ORTHANC")
    assert destination.timeout_seconds == 5.0  # shared keys are inherited
    config = from_mapping({"pacs": web, "gateways": {"8": {"pacs": {"host": "pacs8.example"}}}})
    destination = config.destination("8")
    assert not destination.dicomweb
    assert (destination.url, destination.token, destination.host) == ("", "", "pacs8.example")
    assert destination.timeout_seconds == 6.0


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"pacs": {"url": "http://a/dw", "host": "b"}}, "pacs.url"),
        ({"pacs": {"url": "ftp://a/dw"}}, "pacs.url"),
        ({"pacs": {"url": "http://user:pw@a/dw"}}, "pacs.url"),
        ({"pacs": {"url": "http://a:99999/dw"}}, "pacs.url"),
        ({"pacs": {"url": "http://a/dw", "username": "u"}}, "pacs.password"),
        ({"pacs": {"url": "http://a/dw", "password": "p"}}, "pacs.username"),
        (
            {"pacs": {"url": "http://a/dw", "username": "u", "password": "p", "token": "t"}},
            "pacs.token",
        ),
        ({"pacs": {"host": "a", "token": "t"}}, "pacs.token"),
        (
            {"pacs": {"url": "http://a/dw"}, "gateways": {"7": {"pacs": {"username": "u"}}}},
            "gateways.7.pacs.password",
        ),
        (
            {"pacs": {"host": "a"}, "gateways": {"7": {"pacs": {"token": "t"}}}},
            "gateways.7.pacs.token",
        ),
    ],
)
def test_dicomweb_errors_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(data)
    assert err.value.key == key


def test_password_file_is_read_stripped_and_resolved_from_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``password_file``: its content is the password, trailing newlines stripped (inner
    spaces kept); relative to the config file's folder; masked by ``config --show``."""
    from service.config import render_settings

    folder = tmp_path / "etc"
    (folder / "secrets").mkdir(parents=True)
    (folder / "secrets" / "pacs").write_text("pa ss w0rd \r\n\n")
    path = folder / "gateway.toml"
    path.write_text(
        '[pacs]\nurl = "https://pacs.example/dicom-web"\nusername = "gateway"\n'
        'password_file = "secrets/pacs"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(path, environ={})
    assert config.pacs.password == "pa ss w0rd "
    assert config.pacs.password_file == str(folder / "secrets" / "pacs")
    assert "pa ss" not in repr(config.pacs) and "tok3n" not in repr(PacsConfig(token="tok3n"))
    settings = effective_settings(config)
    shown = settings["gateways"]["*"]["pacs"]
    assert shown["password_file"] == {
        "value": MASK,
        "source": "file",
        "from": "pacs.password_file",
    }
    assert shown["password"] == {"value": MASK, "source": "file", "from": "pacs.password_file"}
    assert "pa ss" not in render_settings(settings) and "pa ss" not in str(settings)


def test_password_file_from_the_environment_wins_over_the_file_password(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    path = write(
        tmp_path,
        '[pacs]\nurl = "https://pacs.example/dw"\nusername = "u"\npassword = "in-the-file"\n',
    )
    env = {"GATEWAY_PACS_PASSWORD_FILE": str(pki["pacs-password"])}
    config = load_config(path, environ=env)
    assert config.pacs.password == "file-Pa55"
    assert config.pacs.password_file == str(pki["pacs-password"])
    shown = effective_settings(config)["gateways"]["*"]["pacs"]
    assert (
        shown["password"]["from"]
        == shown["password_file"]["from"]
        == ("GATEWAY_PACS_PASSWORD_FILE")
    )
    # and GATEWAY_PACS_PASSWORD over a file's password_file
    path = write(
        tmp_path,
        f'[pacs]\nurl = "https://pacs.example/dw"\nusername = "u"\n'
        f'password_file = "{pki["pacs-password"]}"\n',
    )
    config = load_config(path, environ={"GATEWAY_PACS_PASSWORD": "from-env"})
    assert (config.pacs.password, config.pacs.password_file) == ("from-env", "")


def test_a_gateway_inherits_password_file_and_replaces_both_with_either(
    pki: dict[str, Path],
) -> None:
    web = {"url": "https://pacs.example/dw", "username": "u"}
    secret = str(pki["pacs-password"])
    config = from_mapping(
        {
            "pacs": {**web, "password_file": secret},
            "gateways": {
                "6": {"pacs": {"max_associations": 1}},
                "7": {"pacs": {"password": "own"}},
                "8": {"pacs": {"host": "dimse.example"}},
            },
        }
    )
    six, seven, eight = (config.destination(g) for g in ("6", "7", "8"))
    assert (six.password, six.password_file) == ("file-Pa55", secret)
    assert (seven.password, seven.password_file) == ("own", "")
    assert (eight.password, eight.password_file, eight.username) == ("", "", "")
    config = from_mapping(
        {
            "pacs": {**web, "password": "pacs-pw"},
            "gateways": {"7": {"pacs": {"password_file": secret}}},
        }
    )
    assert config.destination("7").password == "file-Pa55"
    assert config.pacs.password == "pacs-pw"


@pytest.mark.parametrize(
    ("pacs", "own", "key"),
    [
        ({"password_file": "missing"}, None, "pacs.password_file"),
        ({"password_file": "."}, None, "pacs.password_file"),  # a folder
        ({"password_file": "empty"}, None, "pacs.password_file"),
        ({"password_file": "binary"}, None, "pacs.password_file"),
        ({}, {"password_file": "missing"}, "gateways.7.pacs.password_file"),
        ({"password": "pw", "password_file": "pacs-password"}, None, "pacs.password_file"),
        ({}, {"password": "pw", "password_file": "pacs-password"}, "gateways.7.pacs.password_file"),
    ],
)
def test_a_password_file_that_cannot_be_used_is_refused_naming_the_key(
    pacs: dict[str, str], own: dict[str, str] | None, key: str, tmp_path: Path
) -> None:
    (tmp_path / "pacs-password").write_text("not-to-be-shown\n")
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")

    def files(table: dict[str, str]) -> dict[str, str]:
        return {k: str(tmp_path / v) if k == "password_file" else v for k, v in table.items()}

    web = {"url": "https://pacs.example/dw", "username": "u"}
    if not pacs:
        web["password"] = "pacs-pw"
    data: dict[str, Any] = {"pacs": {**web, **files(pacs)}}
    if own is not None:
        data["gateways"] = {"7": {"pacs": files(own)}}
    with pytest.raises(ConfigError) as err:
        from_mapping(data)
    assert err.value.key == key
    assert "not-to-be-shown" not in str(err.value)
    if "password" in (own or pacs):  # both given: the message names both keys
        prefix = key.rpartition(".")[0]
        assert f"{prefix}.password " in str(err.value) and f"{prefix}.password_file" in str(
            err.value
        )


def test_both_password_variables_are_refused_naming_both(pki: dict[str, Path]) -> None:
    env = {
        "GATEWAY_PACS_URL": "https://pacs.example/dw",
        "GATEWAY_PACS_USERNAME": "u",
        "GATEWAY_PACS_PASSWORD": "pw",
        "GATEWAY_PACS_PASSWORD_FILE": str(pki["pacs-password"]),
    }
    with pytest.raises(ConfigError) as err:
        load_config(None, environ=env)
    assert err.value.key == "pacs.password_file" and "pacs.password " in str(err.value)


@pytest.mark.parametrize(
    "url", ["https://web.example/dicom-web", "https://web7.example/dw"], ids=["pacs", "gateway"]
)
def test_an_unloadable_tls_ca_of_a_dicomweb_destination_is_refused_naming_it(
    url: str, pki: dict[str, Path]
) -> None:
    junk = str(pki["junk.pem"])
    if "web7" in url:
        data: dict[str, Any] = {"gateways": {"7": {"pacs": {"url": url, "tls_ca": junk}}}}
        key = "gateways.7.pacs.tls_ca"
    else:
        data, key = {"pacs": {"url": url, "tls_ca": junk}}, "pacs.tls_ca"
    with pytest.raises(ConfigError) as err:
        from_mapping(data)
    assert err.value.key == key and "cannot load" in str(err.value)


def test_plain_http_with_credentials_or_tls_files_is_warned_about(pki: dict[str, Path]) -> None:
    """Names the destination (``[pacs]`` or the gateway) and the url, never a secret."""
    from service.config import plain_http_warnings

    config = from_mapping(
        {
            "pacs": {"url": "http://pacs.example/dw", "username": "u", "password": "hunter2"},
            "gateways": {
                "5": {"pacs": {"url": "https://secure.example/dw"}},
                "7": {
                    "pacs": {
                        "url": "http://web7.example/dw",
                        "token": "tok3n",
                        **{"username": "", "password": ""},  # not [pacs]'s
                    }
                },
                "8": {"pacs": {"url": "http://web8.example/dw", "tls_ca": str(pki["ca.pem"])}},
                "9": {"pacs": {"host": "dimse.example"}},
            },
        }
    )
    warnings = plain_http_warnings(config)
    assert len(warnings) == 4, warnings
    pacs, seven, eight_credentials, eight = warnings  # 8 inherits [pacs]'s credentials
    assert eight_credentials.startswith("gateway 8:") and "unencrypted" in eight_credentials
    assert pacs.startswith("[pacs]") and "http://pacs.example/dw" in pacs
    assert "unencrypted" in pacs and "username and password" in pacs
    assert seven.startswith("gateway 7:") and "http://web7.example/dw" in seven
    assert "token" in seven and "unencrypted" in seven
    assert eight.startswith("gateway 8:") and "tls_ca" in eight and "not used" in eight
    assert not any("hunter2" in w or "tok3n" in w for w in warnings)
    assert plain_http_warnings(from_mapping({"pacs": {"url": "http://open.example/dw"}})) == []


def test_ledger_is_sqlite_in_state_or_a_postgresql_url_shown_masked(tmp_path: Path) -> None:
    from service.config import render_settings

    assert load_config(environ={}).ledger_location == Path("STATE") / "ledger.sqlite3"
    url = "postgresql://gateway:pg-s3cret@db.example:5432/ledger"
    config = load_config(environ={"GATEWAY_LEDGER": url})
    assert config.ledger == config.ledger_location == url
    shown = effective_settings(config)["service"]["ledger"]
    masked = "postgresql://gateway:********@db.example:5432/ledger"
    assert shown == {"value": masked, "source": "env", "from": "GATEWAY_LEDGER"}
    assert config.ledger_shown == masked
    for text in (render_settings(effective_settings(config)), repr(config)):
        assert "pg-s3cret" not in text
    path = tmp_path / "gateway.toml"
    path.write_text('[service]\nledger = "postgres://h/db?password=pw-in-query"\n')
    from_file = load_config(path, environ={})
    assert "pw-in-query" not in from_file.ledger_shown and from_file.ledger.endswith("query")
    with pytest.raises(ConfigError) as err:
        load_config(environ={"GATEWAY_LEDGER": "mysql://u:hidden@h/db"})
    assert err.value.key == "service.ledger" and "hidden" not in str(err.value)
