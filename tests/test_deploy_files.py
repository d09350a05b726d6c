"""The deployment files people copy: they must at least parse and validate."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bastion.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_docker_compose_file_is_valid() -> None:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose missing: run scripts/setup.sh"
    result = subprocess.run(
        [compose, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr


def test_example_settings_load() -> None:
    for path in (ROOT / "deploy/examples/bastion.toml", ROOT / "deploy/docker/bastion.toml"):
        settings = load_settings(path)
        assert settings.server.listen_port in (22, 2222)
        assert settings.vault.enabled
