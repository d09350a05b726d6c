"""Settings: one TOML file, parsed and validated once into frozen dataclasses.

Every error names the file and the key (``bastion.toml: [consul] stale_after:
must be a number of seconds >= 0``), and a TOML syntax error keeps the line
and column tomllib reports. Unknown keys are errors too: a misspelled setting
must not silently fall back to a default.
"""

from __future__ import annotations

import grp
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from bastion import access_settings
from bastion.access_settings import AccessSettings, PenaltySettings
from bastion.addresses import consul_base_url, split_host_port
from bastion.errors import ConfigError
from bastion.fastpath import FEATURES as FASTPATH_FEATURES
from bastion.fastpath import features_from_env

AUTH_METHODS = ("publickey", "password", "keyboard-interactive")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# a Consul service name or ID the bastion registers: one DNS label
SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "0.0.0.0:2222"
    host_keys: tuple[Path, ...] = ()
    login_grace_time: float = 30.0
    # pre-auth connections held at once; more are dropped at accept
    max_unauthenticated: int = 256
    # sshd_config(5) MaxStartups "start:rate:full": above start unauthenticated
    # connections, new ones are dropped with a probability rising from rate %
    # to 100 % at full. Empty: min(64, max_unauthenticated):30:max_unauthenticated
    max_startups: str = ""
    # PerSourceMaxStartups and PerSourceNetBlockSize: unauthenticated
    # connections per source block (a /32 for IPv4 and a /64 for IPv6)
    per_source_max_startups: int = 16
    per_source_net_block_size: str = "32:64"
    # ChannelTimeout (any channel type; seconds without data, 0: off) and
    # UnusedConnectionTimeout (seconds with no open channel, 0: off)
    channel_timeout: float = 0.0
    unused_connection_timeout: float = 0.0
    # worker processes behind the address (SO_REUSEPORT, steered by source
    # address; bastion/workers.py); 1: the bastion is one process
    workers: int = 1
    # how the kernel spreads connections over the workers: "source" (by
    # source address, so a person's logins meet their upstream connections)
    # or "kernel" (its 4-tuple hash: even spread, but up to one upstream
    # connection per person and host in each worker)
    worker_steering: str = "source"
    # addresses (CIDRs) of load balancers that send a PROXY protocol header
    proxy_protocol_from: tuple[str, ...] = ()
    max_auth_attempts: int = 6
    # the bastion's log level (DEBUG, INFO, WARNING, ERROR); unset: the
    # command line's --log-level
    log_level: str | None = None
    # a drain (SIGTERM, `bastion drain`) lets live sessions run this long, seconds
    drain_timeout: float = 3600.0
    # open session channels per connection, as sshd's MaxSessions (default 10)
    max_sessions: int = 10
    # open channels of any kind per connection (sessions and tunnels); each
    # can hold up to one SSH window (2 MiB) of data in flight
    max_channels: int = 100
    auth_methods: tuple[str, ...] = ("publickey",)
    # local authorized keys: <dir>/<user> in OpenSSH authorized_keys format
    authorized_keys_dir: Path | None = None
    # trusted CA for users' own certificates (OpenSSH public key lines)
    user_ca_keys: Path | None = None
    # environment variables passed upstream (fnmatch patterns)
    env_allow: tuple[str, ...] = ("LANG", "LC_*")
    banner_version: str = "bastion"

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen, 2222)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen, 2222)[1]


@dataclass(frozen=True)
class ConsulSettings:
    address: str = "http://127.0.0.1:8500"
    # exactly one source of the token: file, environment variable, or Vault KV
    token_file: Path | None = None
    token_env: str | None = None
    token_vault_path: str | None = None
    token_vault_field: str = "token"
    routes_prefix: str = "users/"
    keys_prefix: str = "ssh-keys/"
    host_keys_prefix: str = "host-keys/"
    # blocking-query wait, seconds
    wait: float = 30.0
    # keep serving the last table this long after Consul became unreachable
    stale_after: float = 300.0
    # give up on the first load after this long (logins refused until loaded)
    request_timeout: float = 5.0
    # register the bastion's own service (script check comes from the agent config)
    service_name: str = "ssh-bastion"
    # `bastion register`: the service ID on the local agent ("" = <service_name>-<port>,
    # so that bastions sharing an agent do not collide) and the local script
    # check's interval and timeout, seconds
    service_id: str = ""
    check_interval: float = 10.0
    check_timeout: float = 3.0


@dataclass(frozen=True)
class VaultSettings:
    address: str | None = None
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    token_file: Path | None = None
    approle_mount: str = "approle"
    ssh_mount: str = "ssh-client-signer"
    ssh_role: str = "bastion"
    timeout: float = 5.0
    ca_cert: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None


@dataclass(frozen=True)
class UpstreamSettings:
    # local CA private key, used when [vault] is not configured
    ca_key: Path | None = None
    known_hosts: Path | None = None
    # also accept host keys published in Consul KV under consul.host_keys_prefix
    host_keys_from_directory: bool = True
    connect_timeout: float = 5.0
    cert_ttl: int = 300
    default_port: int = 22
    keepalive_interval: float = 30.0
    # a person's authenticated upstream connection stays open this many
    # seconds after their last connection through it ends, and their next
    # login to the same host and account reuses it (like OpenSSH's
    # ControlPersist: no new handshake or certificate); 0 turns reuse off
    reuse_idle: float = 10.0
    # never reused once this many seconds old; default and maximum: cert_ttl
    reuse_max_age: int | None = None
    # person connections sharing one upstream connection at most
    reuse_max_shared: int = 4
    # CIDRs for the certificates' source-address critical option (the
    # bastion's egress addresses); empty: no source-address
    source_address: tuple[str, ...] = ()

    @property
    def reuse_max_age_seconds(self) -> int:
        return self.cert_ttl if self.reuse_max_age is None else self.reuse_max_age


@dataclass(frozen=True)
class AuditSettings:
    # JSON lines; "-" is stderr
    file: str = "-"
    # also send every record to the local syslog socket (journald reads /dev/log)
    syslog: bool = False
    syslog_socket: Path = Path("/dev/log")


@dataclass(frozen=True)
class MetricsSettings:
    listen: str | None = None


DEFAULT_ADMIN_SOCKET = "/run/bastion/admin.sock"


@dataclass(frozen=True)
class AdminSettings:
    # the local admin socket `bastion sessions` and `bastion kill` use; "" = off
    socket: str = DEFAULT_ADMIN_SOCKET
    # a group whose members may use it, besides root and the bastion's own user
    group: str | None = None

    @property
    def socket_path(self) -> Path | None:
        return Path(self.socket) if self.socket else None


# the smallest per-session cap: room for the header and the closing marker
MIN_RECORDING_SESSION_BYTES = 8192


@dataclass(frozen=True)
class RecordingSettings:
    """Session recordings (asciicast v2, bastion/recording.py); off without ``dir``."""

    # <dir>/<session id>.cast, files 0600 in a 0700 directory
    dir: Path | None = None
    # record everyone whose directory entry does not say "record": false
    default: bool = False
    # also record what the person types ("i" events: typed passwords too)
    input: bool = False
    # also record exec sessions (``ssh host cmd``): the command and its output
    exec: bool = False
    # one session's file at most; then its recording stops, the session goes on
    max_session_bytes: int = 100_000_000
    # all recordings at most; the oldest finished ones are removed first
    max_total_bytes: int = 10_000_000_000

    @property
    def enabled(self) -> bool:
        return self.dir is not None


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    consul: ConsulSettings = field(default_factory=ConsulSettings)
    vault: VaultSettings = field(default_factory=VaultSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    recording: RecordingSettings = field(default_factory=RecordingSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    penalties: PenaltySettings = field(default_factory=PenaltySettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    # the asyncssh speed-ups to apply, from the environment variable
    # BASTION_TUNING (unset or "all", "none", or a comma-separated list)
    fastpath: tuple[str, ...] = FASTPATH_FEATURES
    source: Path | None = None

    @property
    def startups(self) -> tuple[int, int, int]:
        """MaxStartups as (start, rate %, full) (``[server] max_startups``)."""
        mu = self.server.max_unauthenticated
        value = self.server.max_startups or f"{min(64, mu)}:30:{mu}"
        return access_settings.parse_max_startups(value)

    @property
    def consul_service_id(self) -> str:
        """This bastion's service ID on its Consul agent: ``[consul] service_id``,
        or ``<service_name>-<listen port>``."""
        return self.consul.service_id or f"{self.consul.service_name}-{self.server.listen_port}"


T = TypeVar("T")


def _build(cls: type[T], raw: Any, where: str, base: Path) -> T:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for name, value in raw.items():
        default = getattr(defaults, name)
        kwargs[name] = _coerce(value, default, f"{where} {name}", base, known[name].type)
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str, base: Path, typ: Any) -> Any:
    typ_s = str(typ)
    if "Path" in typ_s and "tuple" in typ_s:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of paths")
        return tuple(_path(v, base) for v in value)
    if "tuple" in typ_s:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: must be a list of strings")
        return tuple(value)
    if "Path" in typ_s:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a path")
        return _path(value, base)
    if "bool" in typ_s:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false")
        return value
    if "float" in typ_s or "int" in typ_s:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{where}: must be a number >= 0")
        return int(value) if "int" in typ_s else float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string")
    return value


def _path(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def parse_settings(
    raw: dict[str, Any], source: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate a decoded TOML document (relative paths resolve next to ``source``)
    and the environment the bastion reads (``BASTION_TUNING``; default: none set)."""
    label = str(source) if source else "<settings>"
    base = source.parent if source else Path.cwd()
    sections = {
        "server": ServerSettings,
        "consul": ConsulSettings,
        "vault": VaultSettings,
        "upstream": UpstreamSettings,
        "audit": AuditSettings,
        "metrics": MetricsSettings,
        "recording": RecordingSettings,
        "admin": AdminSettings,
        "penalties": PenaltySettings,
        "access": AccessSettings,
    }
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{label}: unknown section(s) {', '.join(unknown)}")
    built: dict[str, Any] = {
        name: _build(cls, raw.get(name, {}), f"{label}: [{name}]", base)
        for name, cls in sections.items()
    }
    env = environ if environ is not None else {}
    try:
        fastpath = features_from_env(env.get("BASTION_TUNING"))
    except ValueError as exc:
        raise ConfigError(f"environment BASTION_TUNING: {exc}") from None
    settings = Settings(**built, fastpath=fastpath, source=source)
    _validate(settings, label)
    _validate_recording(settings.recording, label)
    access_settings.validate(settings, label)
    return settings


def _validate(s: Settings, label: str) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{label}: {msg}")

    try:
        split_host_port(s.server.listen, 2222)
    except ValueError as exc:
        raise bad(f"[server] listen: {exc}") from None
    if not 1 <= s.server.workers <= 64:
        raise bad("[server] workers: must be between 1 and 64")
    if s.server.worker_steering not in ("source", "kernel"):
        raise bad('[server] worker_steering: "source" or "kernel"')
    for key in ("max_sessions", "max_channels", "max_auth_attempts", "max_unauthenticated"):
        if getattr(s.server, key) < 1:
            raise bad(f"[server] {key}: must be at least 1 (0 would refuse everyone)")
    if s.server.log_level is not None and s.server.log_level.upper() not in LOG_LEVELS:
        raise bad(f"[server] log_level: one of {', '.join(LOG_LEVELS)}")
    if not s.server.host_keys:
        raise bad("[server] host_keys: at least one host key file is required")
    for method in s.server.auth_methods:
        if method not in AUTH_METHODS:
            raise bad(
                f"[server] auth_methods: unknown method {method!r} "
                f"(choose from {', '.join(AUTH_METHODS)})"
            )
    if not s.server.auth_methods:
        raise bad("[server] auth_methods: must name at least one method")
    try:
        consul_base_url(s.consul.address)
    except ValueError as exc:
        raise bad(f"[consul] address: {exc}") from None
    token_sources = [
        x for x in (s.consul.token_file, s.consul.token_env, s.consul.token_vault_path) if x
    ]
    if len(token_sources) > 1:
        raise bad("[consul] token_file, token_env and token_vault_path are exclusive")
    if s.consul.token_vault_path and not s.vault.enabled:
        raise bad("[consul] token_vault_path needs a [vault] address")
    for key in ("service_name", "service_id"):
        value = getattr(s.consul, key)
        # a DNS label (<name>.service.consul) and a file name (bastion register)
        if value and not SERVICE_NAME_RE.fullmatch(value):
            raise bad(f"[consul] {key}: letters, digits and '-' only, at most 63: {value!r}")
    if not 1 <= s.consul.check_interval <= 3600:
        raise bad("[consul] check_interval: must be between 1 and 3600 seconds")
    if not 1 <= s.consul.check_timeout <= s.consul.check_interval:
        raise bad("[consul] check_timeout: must be between 1 second and check_interval")
    for key in ("routes_prefix", "keys_prefix", "host_keys_prefix"):
        prefix = getattr(s.consul, key)
        if not prefix.endswith("/") or prefix.startswith("/"):
            raise bad(f"[consul] {key}: must end with '/' and not start with it: {prefix!r}")
    if s.vault.enabled:
        has_approle = s.vault.role_id_file and s.vault.secret_id_file
        if not has_approle and not s.vault.token_file:
            raise bad("[vault] needs role_id_file and secret_id_file (AppRole), or token_file")
    elif s.upstream.ca_key is None and "publickey" in s.server.auth_methods:
        raise bad(
            "[upstream] ca_key is required when [vault] is not configured "
            "(the bastion signs per-login certificates with it)"
        )
    if not 30 <= s.upstream.cert_ttl <= 3600:
        raise bad("[upstream] cert_ttl: must be between 30 and 3600 seconds")
    if not 0 <= s.upstream.reuse_idle <= 600:
        raise bad("[upstream] reuse_idle: must be between 0 (off) and 600 seconds")
    if s.upstream.reuse_max_age is not None and not (
        1 <= s.upstream.reuse_max_age <= s.upstream.cert_ttl
    ):
        raise bad(
            "[upstream] reuse_max_age: must be between 1 and cert_ttl "
            f"({s.upstream.cert_ttl}) seconds"
        )
    if not 1 <= s.upstream.reuse_max_shared <= 8:
        raise bad("[upstream] reuse_max_shared: must be between 1 and 8 (sshd's MaxSessions is 10)")
    if s.upstream.known_hosts is None and not s.upstream.host_keys_from_directory:
        raise bad(
            "[upstream] known_hosts or host_keys_from_directory is required: "
            "upstream host keys are always verified"
        )
    if s.admin.socket:
        if not s.admin.socket.startswith("/"):
            raise bad('[admin] socket: must be an absolute path (or "" to turn it off)')
        # sockaddr_un.sun_path holds 108 bytes, the last one a NUL
        if len(os.fsencode(s.admin.socket)) > 107:
            raise bad("[admin] socket: longer than 107 bytes, the limit of a Unix socket path")
    if s.admin.group is not None:
        try:
            grp.getgrnam(s.admin.group)
        except KeyError:
            raise bad(f"[admin] group: no such group {s.admin.group!r}") from None


def _validate_recording(r: RecordingSettings, label: str) -> None:
    """The ``[recording]`` section (part of the validation at load)."""
    if r.dir is None:
        for key in ("default", "input", "exec"):
            if getattr(r, key):
                raise ConfigError(
                    f"{label}: [recording] {key}: needs [recording] dir "
                    "(recording is off without it)"
                )
        return
    if r.max_session_bytes < MIN_RECORDING_SESSION_BYTES:
        raise ConfigError(
            f"{label}: [recording] max_session_bytes: must be at least "
            f"{MIN_RECORDING_SESSION_BYTES}"
        )
    if r.max_total_bytes < r.max_session_bytes:
        raise ConfigError(
            f"{label}: [recording] max_total_bytes: must be at least max_session_bytes "
            f"({r.max_session_bytes})"
        )


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate ``path`` and the environment (``os.environ`` unless
    given); every problem is a ConfigError naming the file and key, or the
    variable."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return parse_settings(raw, path.resolve(), os.environ if environ is None else environ)
