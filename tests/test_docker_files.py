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
from service.config import ENV_KEYS, load_config
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
