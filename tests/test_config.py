"""Settings are validated once, and every error names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.addresses import split_host_port
from bastion.config import load_settings
from bastion.errors import ConfigError
from bastion.secretfiles import read_secret_file

GOOD = """
[server]
host_keys = ["hostkey"]
[consul]
token_file = "consul.token"
[upstream]
ca_key = "ca"
known_hosts = "known_hosts"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bastion.toml"
    path.write_text(text)
    return path


def test_good_settings_resolve_paths_next_to_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.server.host_keys == (tmp_path / "hostkey",)
    assert settings.consul.token_file == tmp_path / "consul.token"
    assert settings.server.listen_port == 2222
    assert not settings.vault.enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "\n[server2]\n", "unknown section(s) server2"),
        (
            GOOD.replace("[consul]", "[consul]\ntoken_fiel = 'x'"),
            "[consul]: unknown key(s) token_fiel",
        ),
        (
            GOOD.replace("[consul]", "[consul]\nstale_after = 'soon'"),
            "[consul] stale_after: must be a number",
        ),
        (GOOD.replace('host_keys = ["hostkey"]', ""), "[server] host_keys: at least one"),
        (
            GOOD.replace("[server]", "[server]\nauth_methods = ['telepathy']"),
            "unknown method 'telepathy'",
        ),
        (
            GOOD.replace("[server]", "[server]\nlisten = '0.0.0.0:99999'"),
            "[server] listen: bad port",
        ),
        (GOOD.replace('ca_key = "ca"', ""), "[upstream] ca_key is required"),
        (GOOD.replace("[consul]", "[consul]\ntoken_env = 'X'"), "are exclusive"),
        (
            GOOD.replace("[consul]", "[consul]\nroutes_prefix = 'users'"),
            "routes_prefix: must end with '/'",
        ),
        (GOOD + "\n[vault]\naddress = 'http://v'\n", "[vault] needs role_id_file"),
        (GOOD + "reuse_idle = 601\n", "[upstream] reuse_idle: must be between 0 (off) and 600"),
        (GOOD + "reuse_max_age = 301\n", "reuse_max_age: must be between 1 and cert_ttl (300)"),
        (GOOD + "reuse_max_age = 0\n", "reuse_max_age: must be between 1 and cert_ttl"),
        (GOOD + "reuse_max_shared = 9\n", "reuse_max_shared: must be between 1 and 8"),
        ("[server\n", "bastion.toml"),
    ],
)
def test_errors_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert message in str(info.value)
    assert str(tmp_path / "bastion.toml") in str(info.value)


def test_reuse_defaults_follow_cert_ttl(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD + "cert_ttl = 120\n"))
    assert settings.upstream.reuse_idle == 10.0
    assert settings.upstream.reuse_max_age_seconds == 120
    settings = load_settings(write(tmp_path, GOOD + "reuse_idle = 0\nreuse_max_age = 60\n"))
    assert (settings.upstream.reuse_idle, settings.upstream.reuse_max_age_seconds) == (0.0, 60)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "nope.toml")


def test_secret_files_must_be_private(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cr3t\n")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        read_secret_file(secret, "[consul] token_file")
    assert "s3cr3t" not in str(info.value)
    secret.chmod(0o600)
    assert read_secret_file(secret, "[consul] token_file") == "s3cr3t"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("host", ("host", 22)),
        ("host:2200", ("host", 2200)),
        ("[::1]", ("::1", 22)),
        ("[::1]:2200", ("::1", 2200)),
    ],
)
def test_split_host_port(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value, 22) == expected
