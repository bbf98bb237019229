"""The Docker files agree with the code: env keys, paths, ports and CLI subcommands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import build_parser
from service.config import ENV_KEYS, load_config, parse_roles
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose-development.yml"
DOCKERFILE = ROOT / "Dockerfile"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def dockerfile_env() -> dict[str, str]:
    """``ENV`` values of the Dockerfile (``KEY=value`` form, with line continuations)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for word in shlex.split(line.strip()[4:]):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def exec_form(instruction: str) -> list[str]:
    """The JSON exec form of the last ``instruction`` line (CMD, or HEALTHCHECK's CMD)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.strip().startswith(instruction + " ")]
    assert lines, f"no {instruction} in the Dockerfile"
    match = re.search(r"CMD\s+(\[.*\])\s*$", lines[-1])
    assert match, f"{instruction} must use the exec form: {lines[-1]}"
    command: list[str] = json.loads(match.group(1))
    return command


def gateway_env(compose: dict[str, Any]) -> dict[str, str]:
    env = compose["services"]["gateway"]["environment"]
    return {str(k): str(v) for k, v in env.items()}


def test_every_gateway_variable_is_known_and_valid(compose: dict[str, Any]) -> None:
    env = {**dockerfile_env(), **gateway_env(compose)}
    gateway_keys = {k for k in env if k.startswith("GATEWAY_")}
    assert gateway_keys, "no GATEWAY_* variables found"
    assert gateway_keys <= set(ENV_KEYS), gateway_keys - set(ENV_KEYS)
    config = load_config(environ={k: env[k] for k in gateway_keys})
    assert config.pacs.host == "orthanc"
    assert config.input_dir == Path("/app/INPUT")


def test_volumes_mount_the_configured_folders(compose: dict[str, Any]) -> None:
    env = dockerfile_env()
    mounts = {v.split(":")[1] for v in compose["services"]["gateway"]["volumes"]}
    for key in ("GATEWAY_INPUT_DIR", "GATEWAY_OUTPUT_DIR", "GATEWAY_STATE_DIR"):
        assert env[key] in mounts, f"{key}={env[key]} is not a mounted volume"
    named = {v.split(":")[0] for v in compose["services"]["gateway"]["volumes"]}
    assert "state" in named and "state" in compose["volumes"]


def test_pacs_port_and_ae_title_match_orthanc(compose: dict[str, Any]) -> None:
    env = gateway_env(compose)
    orthanc = compose["services"]["orthanc"]
    assert env["GATEWAY_PACS_HOST"] in compose["services"]
    container_ports = {str(p).split(":")[-1] for p in orthanc["ports"]}
    assert env["GATEWAY_PACS_PORT"] in container_ports
    assert orthanc["environment"]["ORTHANC__DICOM_AET"] == env["GATEWAY_PACS_AE_TITLE"]
    for service in compose["services"].values():
        assert service["restart"] == "unless-stopped"


def test_cmd_and_healthcheck_are_real_cli_commands() -> None:
    parser = build_parser()
    cmd = exec_form("CMD")
    health = exec_form("HEALTHCHECK")
    assert cmd[:2] == ["python", "main.py"] and health[:2] == ["python", "main.py"]
    parser.parse_args(cmd[2:])
    args = parser.parse_args(health[2:])
    assert args.health is True
    fetch = "RUN python main.py models fetch"
    assert fetch in DOCKERFILE.read_text()
    parser.parse_args(fetch.split()[3:])


def test_image_runs_as_a_non_root_user() -> None:
    users = [
        line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.startswith("USER ")
    ]
    assert users and users[-1] not in ("root", "0")


def test_development_script_uses_the_compose_file() -> None:
    script = (ROOT / "development.sh").read_text()
    assert "set -euo pipefail" in script
    match = re.search(r"COMPOSE_FILE=(\S+)", script)
    assert match and (ROOT / match.group(1)).exists()
    for step in ("down", "build", "up -d"):
        assert f'docker compose -f "$COMPOSE_FILE" {step}' in script


def test_compose_command_is_a_real_cli_command_with_a_valid_config(
    compose: dict[str, Any],
) -> None:
    command = compose["services"]["gateway"]["command"]
    assert command[:2] == ["python", "main.py"]
    args = build_parser().parse_args(command[2:])
    env = {k: str(v) for k, v in compose["services"]["gateway"]["environment"].items()}
    config = load_config(ROOT / args.config, environ=env)
    assert config.destination("1").host == "orthanc"
    assert [rule.model for rule in config.defaults.rules] == ["cxr-densenet121", "annotate"]


def test_console_port_is_exposed_and_published(compose: dict[str, Any]) -> None:
    """The console listens on every interface in the container, on the port the Dockerfile
    EXPOSEs and the compose file publishes."""
    from service.config import split_listen

    env = {**dockerfile_env(), **gateway_env(compose)}
    host, port = split_listen(load_config(environ={"GATEWAY_HTTP": env["GATEWAY_HTTP"]}).http)
    assert host == "0.0.0.0"
    exposed = re.findall(r"^EXPOSE\s+(\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert str(port) in exposed
    published = {str(p).split(":")[-1] for p in compose["services"]["gateway"]["ports"]}
    assert str(port) in published


# -- docker-compose-scale.yml: PostgreSQL, one intake node, two worker nodes, Orthanc --------

SCALE = ROOT / "docker-compose-scale.yml"
NODES = ("intake", "worker-1", "worker-2")


@pytest.fixture(scope="module")
def scale() -> dict[str, Any]:
    data = yaml.safe_load(SCALE.read_text())  # resolves the x-node anchors and merge keys
    assert isinstance(data, dict)
    return data


def node_env(scale: dict[str, Any], name: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in scale["services"][name]["environment"].items()}


def test_scale_services_and_restart(scale: dict[str, Any]) -> None:
    assert set(scale["services"]) == {"postgres", "orthanc", *NODES}
    for service in scale["services"].values():
        assert service["restart"] == "unless-stopped"
    for name in NODES:  # every node is the project's image, started once PostgreSQL answers
        node = scale["services"][name]
        assert node["build"] == {"context": ".", "dockerfile": "Dockerfile"}
        assert node["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert len({scale["services"][n]["image"] for n in NODES}) == 1


def test_scale_node_variables_are_known_and_valid(scale: dict[str, Any]) -> None:
    names = set()
    for name in NODES:
        env = {**dockerfile_env(), **node_env(scale, name)}
        keys = {k for k in env if k.startswith("GATEWAY_")}
        assert keys <= set(ENV_KEYS), keys - set(ENV_KEYS)
        config = load_config(environ={k: env[k] for k in keys})
        assert config.pacs.host == "orthanc" and config.node_name == name
        names.add(config.node_name)
    assert len(names) == len(NODES)  # each node recorded under a name of its own


def test_scale_ledger_url_is_the_postgres_service(scale: dict[str, Any]) -> None:
    from urllib.parse import urlsplit

    db = scale["services"]["postgres"]
    urls = {node_env(scale, name)["GATEWAY_LEDGER"] for name in NODES}
    assert len(urls) == 1  # one ledger for every node
    url = urlsplit(urls.pop())
    assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432
    assert url.username == db["environment"]["POSTGRES_USER"]
    assert url.password == db["environment"]["POSTGRES_PASSWORD"]
    assert url.path == "/" + db["environment"]["POSTGRES_DB"]
    assert "pg_isready" in db["healthcheck"]["test"]
    data = {v.split(":")[0]: v.split(":")[1] for v in db["volumes"]}
    assert data["ledger"] == "/var/lib/postgresql/data" and "ledger" in scale["volumes"]


def test_scale_commands_are_real_cli_commands_with_roles(scale: dict[str, Any]) -> None:
    parser = build_parser()
    roles = {}
    for name in NODES:
        node = scale["services"][name]
        command = node["command"]
        assert command[:2] == ["python", "main.py"]
        args = parser.parse_args(command[2:])
        assert args.command == "serve"
        assert (ROOT / args.config).is_file()
        config = load_config(ROOT / args.config, environ=node_env(scale, name))
        assert config.ledger.startswith("postgresql://")
        roles[name] = set(parse_roles(args.role, "--role"))
    assert roles == {"intake": {"intake", "send"}, "worker-1": {"run"}, "worker-2": {"run"}}


def test_scale_volumes_share_input_output_and_keep_state_apart(scale: dict[str, Any]) -> None:
    env = dockerfile_env()
    states = []
    for name in NODES:
        mounts = {v.split(":")[1]: v.split(":")[0] for v in scale["services"][name]["volumes"]}
        assert mounts[env["GATEWAY_INPUT_DIR"]] == "./INPUT"  # the same folders on each node
        assert mounts[env["GATEWAY_OUTPUT_DIR"]] == "./OUTPUT"
        state = mounts[env["GATEWAY_STATE_DIR"]]
        assert state in scale["volumes"]  # a named volume of its own
        states.append(state)
        inputs = [v for v in scale["services"][name]["volumes"] if v.startswith("./INPUT:")]
        assert inputs == ["./INPUT:/app/INPUT:ro"]  # input is never written
    assert len(set(states)) == len(NODES)


def test_scale_pacs_and_console(scale: dict[str, Any]) -> None:
    orthanc = scale["services"]["orthanc"]
    ports = {str(p).split(":")[-1] for p in orthanc["ports"]}
    for name in NODES:
        env = node_env(scale, name)
        assert env["GATEWAY_PACS_PORT"] in ports
        assert orthanc["environment"]["ORTHANC__DICOM_AET"] == env["GATEWAY_PACS_AE_TITLE"]
    published = [str(p) for p in scale["services"]["intake"]["ports"]]
    assert published == ["127.0.0.1:8080:8080"]  # one console published, on loopback
    assert all("ports" not in scale["services"][n] for n in NODES[1:])
