"""One validated configuration object, built once at start.

Sources, later ones winning: built-in defaults, a TOML file (``--config``), then
environment variables with the prefix ``GATEWAY_``. Every error names the bad key.

TOML layout::

    [service]            # folders, watching, UID root, limits
    [defaults]           # per-gateway settings applied to every gateway (no destination)
    [pacs]               # the service-wide destination
    [models.cxr]         # chest X-ray model settings
    [gateways.<id>]      # per-gateway overrides (stable_seconds, layout, pacs, rules)

A gateway's own destination table (``[gateways.<id>] pacs = {...}``) inherits every key it
does not set from the effective ``[pacs]`` (file and environment), so it can never drop
TLS, the calling AE title or a bound by leaving them out. Relative paths in a file resolve
from the file's folder; those from the environment from the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import ssl
import tomllib
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import ConfigError

#: pydicom's registered root; sites should configure their own (PS3.5 §9, Annex B).
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."
GATEWAY_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 §6.2 AE VR, no backslash
LAYOUTS = ("study", "flat")
WATCH_MODES = ("native", "polling")
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")  # PS3.5 §9.1
CXR_RUNTIMES = ("auto", "onnxruntime", "torch")
DEVICES_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
#: ``service.node_name``: printable ASCII without spaces, as a host name.
NODE_NAME_RE = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass(frozen=True)
class PacsConfig:
    """A destination: DIMSE C-STORE (``host``; PS3.7 §9.1.1, PS3.8 association parameters)
    or DICOMweb STOW-RS (``url``; PS3.18 §10.5), never both.

    ``timeout_seconds``, ``max_associations`` (concurrent requests for DICOMweb) and the TLS
    files apply to both kinds; ``port`` and the AE titles only to DIMSE; ``username`` and
    ``password`` (HTTP Basic; or ``password_file``) or ``token`` (Bearer) only to DICOMweb."""

    url: str = ""  # DICOMweb service root, e.g. http://pacs:8042/dicom-web
    username: str = ""
    password: str = field(default="", repr=False)  # never in a log or a traceback
    #: where ``password`` was read from (its content, trailing newline stripped), or ""
    password_file: str = ""
    token: str = field(default="", repr=False)
    host: str = ""
    port: int = 104
    ae_title: str = "ORTHANC"
    calling_ae_title: str = "AI_GATEWAY"
    timeout_seconds: float = 30.0  # bounds a whole association, not one read
    max_associations: int = 4  # concurrent associations to this destination (SendLanes)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.host or self.url)

    @property
    def dicomweb(self) -> bool:
        """True for a DICOMweb (STOW-RS) destination, False for DIMSE C-STORE."""
        return bool(self.url)


@dataclass(frozen=True)
class Rule:
    """Routes a study to a model when every listed tag matches (empty list = any)."""

    model: str
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()


DEFAULT_RULES: tuple[Rule, ...] = (Rule(model="cxr-densenet121", modality=("CR", "DX")),)


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of one gateway; unknown gateways get the ``[defaults]`` values."""

    stable_seconds: float = 10.0
    max_wait_seconds: float = 600.0
    layout: str = "study"
    rules: tuple[Rule, ...] = DEFAULT_RULES
    pacs: PacsConfig | None = None  # None: use the service-wide default destination


@dataclass(frozen=True)
class CxrConfig:
    weights: str = ""  # "" = torchxrayvision's cache location
    sha256: str = ""
    device: str = "auto"
    threads: int = 0  # 0 = the runtime's default
    #: what runs the forward: auto (ONNX Runtime on the CPU, torch on a GPU), onnxruntime, torch
    runtime: str = "auto"


@dataclass(frozen=True)
class NotifyConfig:
    """``[notify]``: where failures are announced (webhook POST); "" = no notifications."""

    webhook_url: str = ""
    timeout_seconds: float = 5.0


@dataclass(frozen=True)
class Config:
    input_dir: Path = Path("INPUT")
    output_dir: Path = Path("OUTPUT")
    state_dir: Path = Path("STATE")
    uid_root: str = DEFAULT_UID_ROOT
    watch: str = "native"
    rescan_seconds: float = 30.0
    poll_seconds: float = 2.0
    finished_poll_seconds: float = 300.0  # polling: each finished study listed once per
    shutdown_seconds: float = 30.0
    max_file_bytes: int = 2 * 1024**3
    max_pixels: int = 512 * 1024 * 1024  # Rows x Columns x frames
    max_elements: int = 1_000_000  # data elements per file, items and nested ones included
    log_level: str = "INFO"
    workers: int = field(default_factory=lambda: auto_workers())
    max_batch: int = 8
    batch_wait_seconds: float = 0.2
    #: how much a worker process may grow beyond its size after start-up (0: no limit)
    worker_memory_mb: int = 4096
    #: longest a run may take in the worker processes before its worker is killed (0: none)
    run_timeout_seconds: float = 600.0
    #: recorded with every run (``runs.node``), shown by ``studies``; default the host name
    node_name: str = field(default_factory=lambda: default_node_name())
    #: "" = the SQLite ledger in STATE; or a ``postgresql://`` URL (its password masked in
    #: ``config --show``, in messages and in the repr)
    ledger: str = field(default="", repr=False)
    #: with a PostgreSQL ledger: how long a node's hold on a gateway's intake lasts unless
    #: renewed (``intake:<gateway_id>`` leases, renewed with the node's heartbeat)
    intake_lease_seconds: float = 30.0
    #: with a PostgreSQL ledger: how long a node's hold on a run lasts unless renewed
    #: (``run:<run_id>`` leases; a run's outcome is recorded only while it is held)
    run_lease_seconds: float = 30.0
    #: what this node does (``--role``): watch and scan (intake), execute runs (run),
    #: open associations (send); anything but all three needs a PostgreSQL ledger
    roles: tuple[str, ...] = ("intake", "run", "send")
    #: the operator console's ``host:port`` (:mod:`service.console`); "" = no console
    http: str = "127.0.0.1:8080"
    #: Bearer token that allows the console's actions (resend, reprocess); "" = disabled
    http_token: str = ""
    defaults: GatewayConfig = field(default_factory=GatewayConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    cxr: CxrConfig = field(default_factory=CxrConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    gateways: Mapping[str, GatewayConfig] = field(default_factory=dict)
    #: what the loader noticed but did not refuse (unknown ``GATEWAY_*`` variables); the
    #: CLI logs them once logging is configured
    warnings: tuple[str, ...] = ()
    #: dotted key -> where its value came from: ``"file"`` or the ``GATEWAY_*`` variable;
    #: keys not listed have their default (see :func:`effective_settings`)
    sources: Mapping[str, str] = field(default_factory=dict)
    config_file: Path | None = None

    def gateway(self, gateway_id: str) -> GatewayConfig:
        """The settings of ``gateway_id`` (``[defaults]`` when it has none of its own)."""
        return self.gateways.get(gateway_id, self.defaults)

    def destination(self, gateway_id: str) -> PacsConfig:
        """Where results of ``gateway_id`` are sent; ``enabled`` is False for none.

        A gateway's own ``pacs`` table was merged over ``[pacs]`` at load: every key it
        does not set is ``[pacs]``'s."""
        return self.gateway(gateway_id).pacs or self.pacs

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"

    @property
    def ledger_location(self) -> Path | str:
        """Where the ledger is: the PostgreSQL URL when ``ledger`` is set, else the file."""
        return self.ledger or self.ledger_path

    @property
    def ledger_shown(self) -> str:
        """The ledger's location to show or log (a URL's password masked)."""
        return mask_url(self.ledger) if self.ledger else str(self.ledger_path)

    @property
    def quarantine_dir(self) -> Path:
        return self.state_dir / "quarantine"


# -- parsing helpers ---------------------------------------------------------------------


def auto_workers() -> int:
    """``workers = "auto"``: one worker process per core, at least 1, at most 8.

    At least one, so that the bounds on a run (``worker_memory_mb``, ``run_timeout_seconds``)
    hold by default: they need a worker process to kill. On the 2-core bench machine
    (``bench/pipeline.py``, README Performance) 2 workers doubled the ``annotate`` series rate
    (1.93x in-process) and kept the CXR flood rate (1.03x; 1 worker 0.92x)."""
    cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def default_node_name() -> str:
    """The host name, as ``service.node_name`` when none is configured."""
    return socket.gethostname() or "localhost"


def _as_node_name(value: Any, key: str) -> str:
    """``service.node_name``; empty means the host name."""
    text = _as_str(value, key).strip()
    if not text:
        return default_node_name()
    if not NODE_NAME_RE.match(text):
        raise ConfigError(key, f"must be 1-128 printable characters without spaces; got {text!r}")
    return text


def _as_float(value: Any, key: str, minimum: float = 0.0) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected a number, got {value!r}") from None
    if result != result or result < minimum:  # NaN or too small
        raise ConfigError(key, f"must be >= {minimum}, got {value!r}")
    return result


def _as_int(value: Any, key: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise ConfigError(key, f"expected an integer, got {value!r}")
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise ConfigError(key, f"expected an integer, got {value!r}") from None
    if maximum is None and result < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value!r}")
    if result < minimum or (maximum is not None and result > maximum):
        raise ConfigError(key, f"must be between {minimum} and {maximum}, got {value!r}")
    return result


def _as_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _as_choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    text = _as_str(value, key)
    if text not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {text!r}")
    return text


def _as_ae(value: Any, key: str) -> str:
    text = _as_str(value, key)
    if not AE_TITLE_RE.match(text) or not text.strip():
        raise ConfigError(key, f"not a valid AE title (1-16 characters, PS3.5 §6.2): {text!r}")
    return text


def validate_uid_root(value: Any, key: str = "service.uid_root") -> str:
    """A UID root: dotted numeric components, ending in '.', leaving room for a suffix."""
    text = _as_str(value, key)
    if not text.endswith("."):
        text += "."
    if len(text) > 40 or not UID_RE.match(text[:-1]):
        raise ConfigError(key, f"not a valid UID root of at most 40 characters: {text!r}")
    return text


#: :class:`Config` fields that are not ``[service]`` keys.
NOT_SERVICE_KEYS = frozenset(
    {"defaults", "pacs", "cxr", "notify", "gateways", "warnings", "sources", "config_file"}
)
#: Keys that hold a path: relative ones in a config file resolve from the file's folder.
SERVICE_PATH_KEYS = ("input_dir", "output_dir", "state_dir")
PACS_PATH_KEYS = ("tls_ca", "tls_cert", "tls_key")
#: ``password_file`` holds a path too (resolved like the TLS files; read at load).
PACS_FILE_KEYS = (*PACS_PATH_KEYS, "password_file")
#: Destination keys of one kind only: a table that sets the other kind's main key (``url``
#: or ``host``) inherits none of these from its base.
DIMSE_KEYS = ("host", "port", "ae_title", "calling_ae_title")
DICOMWEB_KEYS = ("url", "username", "password", "password_file", "token")
CXR_PATH_KEYS = ("weights",)


def _fields(cls: type, table: dict[str, Any], prefix: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", "unknown key")
    return dict(table)


def _pacs(table: Any, prefix: str, base: PacsConfig) -> PacsConfig:
    """``table``'s keys, validated, over ``base``: every key it does not set is ``base``'s.

    A gateway's table is parsed over the effective ``[pacs]``, so a field added to
    :class:`PacsConfig` is inherited without more code. The kind of a destination is its
    ``url`` (DICOMweb) or ``host`` (DIMSE): a table that sets one of them inherits none of
    the other kind's keys (:data:`DIMSE_KEYS`, :data:`DICOMWEB_KEYS`), and
    :func:`_check_kind` refuses a destination of both kinds or with half its credentials;
    ``effective_settings`` lists a destination's fields from the instance."""
    if not isinstance(table, dict):
        raise ConfigError(prefix.rstrip("."), "expected a table")
    values = _fields(PacsConfig, table, prefix)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key == "port":
            out[key] = _as_int(value, name, 1, 65535)
        elif key == "timeout_seconds":
            out[key] = _as_float(value, name, 0.1)
        elif key == "max_associations":
            out[key] = _as_int(value, name, 1)
        elif key in ("ae_title", "calling_ae_title"):
            out[key] = _as_ae(value, name)
        elif key == "url":
            out[key] = _as_url(value, name)
        else:
            out[key] = _as_str(value, name)
    _password(out, prefix)
    # A table that names its kind inherits nothing of the other kind: a gateway that sets
    # ``url`` over a DIMSE [pacs] (or ``host`` over a DICOMweb one) gets only shared keys.
    blank = PacsConfig()
    if out.get("url"):
        base = dataclasses.replace(base, **{k: getattr(blank, k) for k in DIMSE_KEYS})
    elif out.get("host"):
        base = dataclasses.replace(base, **{k: getattr(blank, k) for k in DICOMWEB_KEYS})
    result = dataclasses.replace(base, **out)
    _check_kind(result, values, prefix)
    return result


def _password(out: dict[str, Any], prefix: str) -> None:
    """A table's ``password`` or ``password_file`` (never both): the file's content is the
    password, and a table that sets either one replaces both of its base's."""
    password, password_file = out.get("password", ""), out.get("password_file", "")
    if password and password_file:
        raise ConfigError(
            f"{prefix}password_file",
            f"set either {prefix}password or {prefix}password_file, not both",
        )
    if password_file:
        out["password"] = read_password_file(password_file, f"{prefix}password_file")
    elif "password" in out or "password_file" in out:
        out["password_file"] = ""
        out.setdefault("password", "")


def read_password_file(path: str, key: str) -> str:
    """The content of a password file, its trailing newline(s) stripped; refused, naming
    ``key``, when it cannot be read or is empty. The content is never put in a message."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(64 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > 64 * 1024:
        raise ConfigError(key, f"{path} is larger than 64 KiB: not a password file")
    try:
        text = data.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(key, f"{path} is empty")
    return text


def _as_url(value: Any, key: str) -> str:
    """A DICOMweb service root: http(s)://host[:port]/path, no credentials, query or
    fragment (credentials go in ``username``/``password`` or ``token``, never in a URL that
    is logged and recorded)."""
    text = _as_str(value, key).strip().rstrip("/")
    if not text:
        return ""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, "must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(key, "must not hold credentials: set username/password or token")
    if parts.query or parts.fragment:
        raise ConfigError(key, "must not have a query or a fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(key, "has an invalid port") from None
    return text


def _check_kind(destination: PacsConfig, own: Mapping[str, Any], prefix: str) -> None:
    """One kind per destination, and credentials that go together; names the key to fix
    (this table's own when it set it)."""

    def name(key: str) -> str:
        return f"{prefix}{key}" if key in own or prefix == "pacs." else f"pacs.{key}"

    d = destination
    if d.url and d.host:
        key = "url" if "url" in own else "host"
        raise ConfigError(name(key), "a destination is DIMSE (host) or DICOMweb (url), not both")
    for given, missing in (("username", "password"), ("password", "username")):
        if getattr(d, given) and not getattr(d, missing):
            # named in the table that set the one without the other
            where = f"{prefix}{missing}" if given in own else f"pacs.{missing}"
            raise ConfigError(where, f"required with {given} (HTTP Basic)")
    if d.token and d.username:
        raise ConfigError(name("token"), "set either token (Bearer) or username/password")
    if not d.url and (d.username or d.token):
        key = "token" if d.token else "username"
        raise ConfigError(name(key), "only for a DICOMweb destination (url)")


def _rules(value: Any, key: str) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, "expected a list of rule tables")
    rules = []
    for index, item in enumerate(value):
        name = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(name, "expected a table")
        values = _fields(Rule, item, f"{name}.")
        if "model" not in values:
            raise ConfigError(f"{name}.model", "required")
        lists: dict[str, tuple[str, ...]] = {}
        for field_name in ("modality", "body_part", "sop_class"):
            raw = values.get(field_name, [])
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
                raise ConfigError(f"{name}.{field_name}", "expected a list of strings")
            lists[field_name] = tuple(v.upper() if field_name != "sop_class" else v for v in raw)
        rules.append(Rule(model=_as_str(values["model"], f"{name}.model"), **lists))
    return tuple(rules)


def _gateway(
    table: Any, prefix: str, base: GatewayConfig, pacs: PacsConfig | None
) -> GatewayConfig:
    """A gateway table over ``base``; its ``pacs`` table over ``pacs`` (the effective
    ``[pacs]``), or refused when ``pacs`` is None (``[defaults]``: the default destination
    is ``[pacs]``, so that ``GATEWAY_PACS_*`` always wins over the file)."""
    if not isinstance(table, dict):
        raise ConfigError(prefix.rstrip("."), "expected a table")
    if pacs is None and "pacs" in table:
        raise ConfigError(
            f"{prefix}pacs",
            "unknown key: the default destination is [pacs] (GATEWAY_PACS_*); a gateway"
            " sets its own with [gateways.<id>] pacs",
        )
    values = _fields(GatewayConfig, table, prefix)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key in ("stable_seconds", "max_wait_seconds"):
            out[key] = _as_float(value, name)
        elif key == "layout":
            out[key] = _as_choice(value, name, LAYOUTS)
        elif key == "rules":
            out[key] = _rules(value, name)
        elif key == "pacs":
            assert pacs is not None
            out[key] = _pacs(value, f"{name}.", pacs)
    return dataclasses.replace(base, **out)


def _service(table: dict[str, Any], out: dict[str, Any]) -> None:
    for key, value in _fields(Config, table, "service.").items():
        name = f"service.{key}"
        if key in NOT_SERVICE_KEYS:
            raise ConfigError(name, "unknown key")
        if key in ("input_dir", "output_dir", "state_dir"):
            out[key] = Path(_as_str(value, name))
        elif key == "uid_root":
            out[key] = validate_uid_root(value, name)
        elif key == "watch":
            out[key] = _as_choice(value, name, WATCH_MODES)
        elif key in ("rescan_seconds", "poll_seconds", "shutdown_seconds", "finished_poll_seconds"):
            out[key] = _as_float(value, name, 0.05)
        elif key in ("max_file_bytes", "max_pixels", "max_elements"):
            out[key] = _as_int(value, name, 1)
        elif key == "workers":
            out[key] = auto_workers() if value == "auto" else _as_int(value, name, 0, 64)
        elif key == "max_batch":
            out[key] = _as_int(value, name, 1, 256)
        elif key == "batch_wait_seconds":
            out[key] = _as_float(value, name)
        elif key == "worker_memory_mb":
            out[key] = _as_int(value, name, 0)
            if 0 < out[key] < 64:
                raise ConfigError(name, f"must be 0 (no limit) or at least 64; got {value!r}")
        elif key == "run_timeout_seconds":
            out[key] = _as_float(value, name)
        elif key in ("intake_lease_seconds", "run_lease_seconds"):
            out[key] = _as_float(value, name, 1.0)
        elif key == "roles":
            out[key] = parse_roles(value, name)
        elif key == "log_level":
            out[key] = _as_choice(str(value).upper(), name, ("DEBUG", "INFO", "WARNING", "ERROR"))
        elif key == "node_name":
            out[key] = _as_node_name(value, name)
        elif key == "ledger":
            out[key] = _as_ledger_url(value, name)
        elif key == "http":
            out[key] = _as_listen(value, name)
        elif key == "http_token":
            out[key] = _as_str(value, name)


#: Every node role, in order (``service.roles``, ``serve --role``).
NODE_ROLES = ("intake", "run", "send")


def parse_roles(value: Any, key: str = "service.roles") -> tuple[str, ...]:
    """Node roles: a comma-separated string (or a list) of intake, run and send, at least
    one, each once; returned in :data:`NODE_ROLES` order."""
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ConfigError(key, f'expected roles like "intake,run,send"; got {value!r}')
    items = [item for item in items if item]
    unknown = sorted(set(items) - set(NODE_ROLES))
    if unknown or not items or len(set(items)) != len(items):
        raise ConfigError(
            key,
            f"must name each of {', '.join(NODE_ROLES)} at most once, at least one; got {value!r}",
        )
    return tuple(role for role in NODE_ROLES if role in items)


def check_roles(config: Config, key: str = "service.roles") -> None:
    """Roles other than all three need a ledger shared by nodes (PostgreSQL)."""
    if tuple(config.roles) != NODE_ROLES and not config.ledger:
        raise ConfigError(
            key,
            f"{','.join(config.roles)} needs a PostgreSQL ledger (service.ledger): with the"
            " SQLite ledger in STATE the one node does every role (intake,run,send)",
        )


def _as_ledger_url(value: Any, name: str) -> str:
    """ "" (SQLite in STATE) or a ``postgresql://`` URL with a host and a database."""
    text = _as_str(value, name).strip()
    if not text:
        return ""
    if not text.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            name, f"must be empty (SQLite in STATE) or a postgresql:// URL; got {mask_url(text)!r}"
        )
    return text


def mask_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``********``, to show or log."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + MASK
    masked = f"{userinfo}{at}{host}{slash}{tail}"
    if "password=" in masked:  # a password given as a query parameter
        masked = re.sub(r"(password=)[^&]*", r"\g<1>" + MASK, masked)
    return f"{scheme}{sep}{masked}"


def split_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) as (host, port); ValueError when malformed."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(text)
    return host, int(port)


def _as_listen(value: Any, key: str) -> str:
    """``service.http``: "" (no console) or ``host:port``."""
    text = _as_str(value, key).strip()
    if text:
        try:
            split_listen(text)
        except ValueError:
            raise ConfigError(
                key, f"must be host:port (or empty: no console); got {text!r}"
            ) from None
    return text


def _notify(table: Any) -> NotifyConfig:
    if not isinstance(table, dict):
        raise ConfigError("notify", "expected a table")
    out: dict[str, Any] = {}
    for key, value in _fields(NotifyConfig, table, "notify.").items():
        name = f"notify.{key}"
        if key == "webhook_url":
            text = _as_str(value, name).strip()
            if text:
                _as_url(text, name)  # the same checks as a DICOMweb root (no credentials)
            out[key] = text
        else:
            out[key] = _as_float(value, name, 0.1)
    return NotifyConfig(**out)


def _cxr(table: Any) -> CxrConfig:
    if not isinstance(table, dict):
        raise ConfigError("models.cxr", "expected a table")
    values = _fields(CxrConfig, table, "models.cxr.")
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"models.cxr.{key}"
        if key == "threads":
            out[key] = _as_int(value, name, 0, 256)
        elif key == "device":
            text = _as_str(value, name)
            if not DEVICES_RE.match(text):
                raise ConfigError(name, f"must be auto, cpu, cuda or cuda:N; got {text!r}")
            out[key] = text
        elif key == "runtime":
            out[key] = _as_choice(value, name, CXR_RUNTIMES)
        elif key == "sha256":
            text = _as_str(value, name).lower()
            if text and not re.fullmatch(r"[0-9a-f]{64}", text):
                raise ConfigError(name, "must be 64 hexadecimal digits")
            out[key] = text
        else:
            out[key] = _as_str(value, name)
    config = CxrConfig(**out)
    if config.runtime == "onnxruntime" and config.device.startswith("cuda"):
        raise ConfigError(
            "models.cxr.runtime", "onnxruntime runs on the CPU here; with a cuda device use torch"
        )
    return config


#: Environment variables and the config key each one sets.
ENV_KEYS: dict[str, str] = {
    "GATEWAY_INPUT_DIR": "service.input_dir",
    "GATEWAY_OUTPUT_DIR": "service.output_dir",
    "GATEWAY_STATE_DIR": "service.state_dir",
    "GATEWAY_UID_ROOT": "service.uid_root",
    "GATEWAY_WATCH": "service.watch",
    "GATEWAY_RESCAN_SECONDS": "service.rescan_seconds",
    "GATEWAY_POLL_SECONDS": "service.poll_seconds",
    "GATEWAY_FINISHED_POLL_SECONDS": "service.finished_poll_seconds",
    "GATEWAY_LOG_LEVEL": "service.log_level",
    "GATEWAY_WORKERS": "service.workers",
    "GATEWAY_WORKER_MEMORY_MB": "service.worker_memory_mb",
    "GATEWAY_RUN_TIMEOUT_SECONDS": "service.run_timeout_seconds",
    "GATEWAY_NODE_NAME": "service.node_name",
    "GATEWAY_LEDGER": "service.ledger",
    "GATEWAY_INTAKE_LEASE_SECONDS": "service.intake_lease_seconds",
    "GATEWAY_RUN_LEASE_SECONDS": "service.run_lease_seconds",
    "GATEWAY_ROLES": "service.roles",
    "GATEWAY_HTTP": "service.http",
    "GATEWAY_HTTP_TOKEN": "service.http_token",
    "GATEWAY_NOTIFY_WEBHOOK_URL": "notify.webhook_url",
    "GATEWAY_NOTIFY_TIMEOUT_SECONDS": "notify.timeout_seconds",
    "GATEWAY_STABLE_SECONDS": "defaults.stable_seconds",
    "GATEWAY_MAX_WAIT_SECONDS": "defaults.max_wait_seconds",
    "GATEWAY_LAYOUT": "defaults.layout",
    "GATEWAY_PACS_HOST": "pacs.host",
    "GATEWAY_PACS_PORT": "pacs.port",
    "GATEWAY_PACS_AE_TITLE": "pacs.ae_title",
    "GATEWAY_PACS_CALLING_AE_TITLE": "pacs.calling_ae_title",
    "GATEWAY_PACS_URL": "pacs.url",
    "GATEWAY_PACS_USERNAME": "pacs.username",
    "GATEWAY_PACS_PASSWORD": "pacs.password",
    "GATEWAY_PACS_PASSWORD_FILE": "pacs.password_file",
    "GATEWAY_PACS_TOKEN": "pacs.token",
    "GATEWAY_CXR_WEIGHTS": "models.cxr.weights",
    "GATEWAY_CXR_SHA256": "models.cxr.sha256",
    "GATEWAY_CXR_DEVICE": "models.cxr.device",
    "GATEWAY_CXR_THREADS": "models.cxr.threads",
    "GATEWAY_CXR_RUNTIME": "models.cxr.runtime",
}


#: The variable of each key in :data:`ENV_KEYS`.
ENV_VARS: dict[str, str] = {dotted: var for var, dotted in ENV_KEYS.items()}
#: Keys that are alternatives: a variable that sets one (not empty) overrides the file's
#: other one.
ENV_ALTERNATIVES: dict[str, str] = {
    "pacs.password": "pacs.password_file",
    "pacs.password_file": "pacs.password",
}


def _drop(data: dict[str, Any], dotted: str) -> None:
    """Remove the key ``dotted`` from a parsed document, if it is there."""
    *parents, leaf = dotted.split(".")
    table: Any = data
    for part in parents:
        table = table.get(part) if isinstance(table, dict) else None
    if isinstance(table, dict):
        table.pop(leaf, None)


#: ``GATEWAY_*`` variables that are not configuration (read where they are used).
NOT_CONFIG_ENV = frozenset({"GATEWAY_FAILPOINTS"})


def _apply_env(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, str], str | None]:
    """Set the keys ``environ`` overrides in ``data``; returns ``{dotted key: variable}`` and
    a warning naming the unknown ``GATEWAY_*`` variables (never their values)."""
    sources: dict[str, str] = {}
    for var, dotted in ENV_KEYS.items():
        if var not in environ:
            continue
        other = ENV_ALTERNATIVES.get(dotted)
        if other is not None and environ[var] and ENV_VARS[other] not in environ:
            _drop(data, other)  # GATEWAY_PACS_PASSWORD_FILE wins over the file's password
        *parents, leaf = dotted.split(".")
        table = data
        for part in parents:
            child = table.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(parents), "expected a table")
            table = child
        table[leaf] = environ[var]
        sources[dotted] = var
    unknown = sorted(
        k
        for k in environ
        if k.startswith("GATEWAY_") and k not in ENV_KEYS and k not in NOT_CONFIG_ENV
    )
    warning = None
    if unknown:
        warning = (
            f"ignored unknown environment variable(s) {', '.join(unknown)}: not configuration"
            " (README, Configuration, lists the GATEWAY_* variables)"
        )
    return sources, warning


def _resolve(value: Any, base: Path) -> Any:
    """A non-empty relative path string from a file, made absolute from ``base``."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Resolve the relative paths a config file gives from its folder, ``base``."""

    def table(parent: Any, name: str) -> dict[str, Any]:
        child = parent.get(name) if isinstance(parent, dict) else None
        return child if isinstance(child, dict) else {}

    tables: list[tuple[dict[str, Any], tuple[str, ...]]] = [
        (table(data, "service"), SERVICE_PATH_KEYS),
        (table(table(data, "models"), "cxr"), CXR_PATH_KEYS),
        (table(data, "pacs"), PACS_FILE_KEYS),
    ]
    gateways = table(data, "gateways")
    tables += [(table(table(gateways, gid), "pacs"), PACS_FILE_KEYS) for gid in gateways]
    for values, keys in tables:
        for key in keys:
            if key in values:
                values[key] = _resolve(values[key], base)


def _leaf_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the values in a parsed TOML document (tables flattened)."""
    keys: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _pem_has(path: str, label: str) -> bool:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return f"-----BEGIN {label}-----" in fh.read(1_000_000)
    except OSError:
        return False


def _refuse_password_prompt() -> bytes:
    """``load_cert_chain``'s password: an encrypted key is refused, never prompted for."""
    return b""


def check_tls(destination: PacsConfig, name: Callable[[str], str]) -> None:
    """Refuse TLS settings the sender could not apply; ``name(key)`` is the dotted key that
    set ``key`` (``pacs.tls_ca`` or ``gateways.<id>.pacs.tls_ca``). Nothing is read back
    into the message but the path and OpenSSL's reason."""
    for key in PACS_PATH_KEYS:
        path = getattr(destination, key)
        if path and not os.path.isfile(path):
            raise ConfigError(name(key), f"no such file: {path}")
    if bool(destination.tls_cert) != bool(destination.tls_key):
        given, missing = (
            ("tls_cert", "tls_key") if destination.tls_cert else ("tls_key", "tls_cert")
        )
        where = name(given).rpartition(".")[0]  # the table that set one without the other
        raise ConfigError(
            f"{where}.{missing}", f"required with {given}: client authentication needs both files"
        )
    if not (destination.tls_ca or destination.tls_cert):
        return
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=destination.tls_ca or None
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            name("tls_ca"), f"cannot load {destination.tls_ca} as CA certificates: {exc}"
        ) from None
    if destination.tls_cert:
        try:
            context.load_cert_chain(
                destination.tls_cert, destination.tls_key, password=_refuse_password_prompt
            )
        except (ssl.SSLError, OSError) as exc:
            if not _pem_has(destination.tls_cert, "CERTIFICATE"):
                raise ConfigError(
                    name("tls_cert"), f"no PEM certificate in {destination.tls_cert}"
                ) from None
            raise ConfigError(
                name("tls_key"),
                f"cannot load {destination.tls_key} as the unencrypted PEM private key of"
                f" {destination.tls_cert}: {exc}",
            ) from None


def _key_namer(prefix: str, own: set[str]) -> Callable[[str], str]:
    """Names a key of a gateway's destination where it was set: its own table, or ``[pacs]``."""

    def name(key: str) -> str:
        return f"{prefix}{key}" if key in own else f"pacs.{key}"

    return name


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the validated :class:`Config` from defaults, a TOML file and ``GATEWAY_*``.

    Relative paths in the file resolve from the file's folder (so do the default folders
    when a file is given); relative paths from the environment, or defaults without a
    file, from the current directory."""
    data: dict[str, Any] = {}
    base_dir: Path | None = None
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
        base_dir = Path(os.path.abspath(path)).parent
        _resolve_paths(data, base_dir)
    in_file = _leaf_keys(data)
    env_sources, warning = _apply_env(data, os.environ if environ is None else environ)
    kept = set(_leaf_keys(data))  # a variable may drop a file key (ENV_ALTERNATIVES)
    sources = {key: "file" for key in in_file if key in kept}
    sources.update(env_sources)
    return from_mapping(
        data,
        base_dir=base_dir,
        sources=sources,
        warnings=() if warning is None else (warning,),
        config_file=None if path is None else Path(os.path.abspath(path)),
    )


def from_mapping(
    data: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    sources: Mapping[str, str] | None = None,
    warnings: tuple[str, ...] = (),
    config_file: Path | None = None,
) -> Config:
    """Validate a parsed TOML document into a :class:`Config`.

    ``base_dir``: the folder the default folders (INPUT, OUTPUT, STATE) resolve from;
    ``sources``: see :attr:`Config.sources` (default: every key in ``data`` is ``"file"``)."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key in data:
        if key not in ("service", "defaults", "pacs", "models", "gateways", "notify"):
            raise ConfigError(key, "unknown section")
    out: dict[str, Any] = {}
    service = data.get("service", {})
    if not isinstance(service, dict):
        raise ConfigError("service", "expected a table")
    _service(service, out)
    if base_dir is not None:
        defaults_of = {f.name: f.default for f in dataclasses.fields(Config)}
        for key in SERVICE_PATH_KEYS:
            out.setdefault(key, base_dir / Path(str(defaults_of[key])))
    defaults = _gateway(data.get("defaults", {}), "defaults.", GatewayConfig(), None)
    out["defaults"] = defaults
    pacs = _pacs(data.get("pacs", {}), "pacs.", PacsConfig())
    check_tls(pacs, lambda key: f"pacs.{key}")
    out["pacs"] = pacs
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError("models", "expected a table")
    for key in models:
        if key != "cxr":
            raise ConfigError(f"models.{key}", "unknown model section")
    out["cxr"] = _cxr(models.get("cxr", {}))
    out["notify"] = _notify(data.get("notify", {}))
    gateways = data.get("gateways", {})
    if not isinstance(gateways, dict):
        raise ConfigError("gateways", "expected a table")
    parsed: dict[str, GatewayConfig] = {}
    for gateway_id, table in gateways.items():
        if not GATEWAY_ID_RE.match(str(gateway_id)):
            raise ConfigError(f"gateways.{gateway_id}", "gateway id must be [A-Za-z0-9_-]{1,64}")
        prefix = f"gateways.{gateway_id}."
        gateway = _gateway(table, prefix, defaults, pacs)
        if gateway.pacs is not None:
            check_tls(gateway.pacs, _key_namer(f"{prefix}pacs.", set(table["pacs"])))
        parsed[str(gateway_id)] = gateway
    out["gateways"] = parsed
    out["warnings"] = warnings
    out["sources"] = dict.fromkeys(_leaf_keys(data), "file") if sources is None else sources
    out["config_file"] = config_file
    config = Config(**out)
    check_roles(config)
    return config


def plain_http_warnings(config: Config) -> list[str]:
    """What ``serve`` warns about at start: a DICOMweb destination on a plain ``http://``
    url with credentials (they would travel unencrypted) or with TLS files (unused). Names
    the gateway and the url, never a credential."""
    destinations = [("[pacs] (every gateway without a destination of its own)", config.pacs)]
    destinations += [
        (f"gateway {gateway_id}", gateway.pacs)
        for gateway_id, gateway in sorted(config.gateways.items())
        if gateway.pacs is not None
    ]
    warnings = []
    for who, d in destinations:
        if not d.dicomweb or urllib.parse.urlsplit(d.url).scheme != "http":
            continue
        if d.token or d.username:
            what = "its Bearer token" if d.token else "its HTTP Basic username and password"
            warnings.append(
                f"{who}: {what} would travel unencrypted to {d.url} (plain http://);"
                " use an https:// url"
            )
        if d.tls_ca or d.tls_cert:
            warnings.append(f"{who}: tls_ca/tls_cert are not used for {d.url} (plain http://)")
    return warnings


# -- the effective configuration, for ``config --show`` -----------------------------------

#: Keys whose values are never shown: masked whatever their value (pacs password, token).
SECRET_KEY_RE = re.compile(r"password|token|secret", re.IGNORECASE)
MASK = "********"
#: ``effective_settings``' name for the gateways without a table of their own.
OTHER_GATEWAYS = "*"


def _plain(value: Any) -> Any:
    """``value`` as JSON types (paths as strings, rules as tables)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Rule):
        table: dict[str, Any] = {"model": value.model}
        table.update(
            {k: list(v) for k, v in dataclasses.asdict(value).items() if k != "model" and v}
        )
        return table
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _setting(name: str, value: Any, chain: list[str], sources: Mapping[str, str]) -> dict[str, Any]:
    """``{"value", "source", "from"}``: the first key of ``chain`` (own key, then the key it
    inherits) that a file or a variable set; ``default`` when none did."""
    source, origin = "default", ""
    for key in chain:
        if key in sources:
            source, origin = ("file", key) if sources[key] == "file" else ("env", sources[key])
            break
    shown = MASK if SECRET_KEY_RE.search(name) else _plain(value)
    if name == "ledger" and isinstance(value, str):
        shown = mask_url(value)
    return {"value": shown, "source": source, "from": origin}


def _set_by(name: str) -> tuple[str, ...]:
    """The destination keys that can set ``name``: ``password`` comes from a
    ``password_file`` too."""
    return (name, "password_file") if name == "password" else (name,)


def _gateway_order(gateway_id: str) -> tuple[int, int, str]:
    return (0, int(gateway_id), "") if gateway_id.isdigit() else (1, 0, gateway_id)


def effective_settings(config: Config, gateway_ids: Iterable[str] = ()) -> dict[str, Any]:
    """What each gateway runs with, each value with its source (``file`` and the key that
    set it, ``env`` and the variable, or ``default``); secret-named keys masked.

    ``gateways`` has the configured gateways, ``gateway_ids`` (those found in INPUT) and
    ``"*"`` for every gateway without a table of its own."""
    sources = config.sources
    service = {
        f.name: _setting(f.name, getattr(config, f.name), [f"service.{f.name}"], sources)
        for f in dataclasses.fields(Config)
        if f.name not in NOT_SERVICE_KEYS
    }
    cxr = {
        f.name: _setting(f.name, getattr(config.cxr, f.name), [f"models.cxr.{f.name}"], sources)
        for f in dataclasses.fields(CxrConfig)
    }
    notify = {
        f.name: _setting(f.name, getattr(config.notify, f.name), [f"notify.{f.name}"], sources)
        for f in dataclasses.fields(NotifyConfig)
    }
    gateways: dict[str, Any] = {}
    ids = sorted(set(config.gateways) | set(gateway_ids), key=_gateway_order)
    for gateway_id in [*ids, OTHER_GATEWAYS]:
        own = [] if gateway_id == OTHER_GATEWAYS else [f"gateways.{gateway_id}."]
        gateway = config.gateway(gateway_id)
        destination = config.destination(gateway_id)
        entry: dict[str, Any] = {
            f.name: _setting(
                f.name,
                getattr(gateway, f.name),
                [p + f.name for p in own] + [f"defaults.{f.name}"],
                sources,
            )
            for f in dataclasses.fields(GatewayConfig)
            if f.name != "pacs"
        }
        entry["pacs"] = {
            f.name: _setting(
                f.name,
                getattr(destination, f.name),
                [f"{p}pacs.{k}" for p in [*own, ""] for k in _set_by(f.name)],
                sources,
            )
            for f in dataclasses.fields(destination)
        }
        gateways[gateway_id] = entry
    return {
        "config_file": None if config.config_file is None else str(config.config_file),
        "warnings": list(config.warnings),
        "service": service,
        "models": {"cxr": cxr},
        "notify": notify,
        "gateways": gateways,
    }


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def render_settings(settings: Mapping[str, Any]) -> str:
    """:func:`effective_settings` as TOML-like text, each value's source in a comment."""
    lines = [
        f"# effective configuration; config file: {settings['config_file'] or 'none'}",
        "# after each value its source: file KEY, env VARIABLE or default",
    ]
    lines += [f"# warning: {warning}" for warning in settings["warnings"]]

    def table(header: str, values: Mapping[str, Any]) -> None:
        lines.append("")
        lines.append(header)
        for key, item in values.items():
            if "source" not in item:  # a nested table (a gateway's pacs)
                continue
            text = f"{key} = {_toml(item['value'])}"
            origin = f"{item['source']} {item['from']}".strip()
            lines.append(f"{text:<44} # {origin}")
        for key, item in values.items():
            if "source" not in item:
                for sub, entry in item.items():
                    text = f"{key}.{sub} = {_toml(entry['value'])}"
                    origin = f"{entry['source']} {entry['from']}".strip()
                    lines.append(f"{text:<44} # {origin}")

    table("[service]", settings["service"])
    table("[models.cxr]", settings["models"]["cxr"])
    table("[notify]", settings["notify"])
    for gateway_id, values in settings["gateways"].items():
        if gateway_id == OTHER_GATEWAYS:
            table('[gateways."*"]  # every gateway without a [gateways.<id>] table', values)
        else:
            table(f"[gateways.{gateway_id}]", values)
    return "\n".join(lines) + "\n"
