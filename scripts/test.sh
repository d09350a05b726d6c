#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests need, then runs
# the linters, the type checker and the whole test suite against the real
# Consul, OpenBao and OpenSSH. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
echo "[test] ruff check"
.venv/bin/ruff check bastion devstack tests bench
echo "[test] ruff format --check"
.venv/bin/ruff format --check bastion devstack tests bench
echo "[test] mypy (strict, bastion/ and devstack/)"
.venv/bin/mypy
echo "[test] shellcheck"
shellcheck deploy/*.sh scripts/*.sh .ci/run
echo "[test] pytest"
exec .venv/bin/pytest "$@"
