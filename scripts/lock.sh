#!/usr/bin/env bash
# Regenerates requirements.lock: the exact versions (with sha256 hashes) that
# scripts/setup.sh, CI and every fresh machine install, resolved from the
# ranges in pyproject.toml (dependencies + the test extra).
#
#   scripts/lock.sh                                     # after editing pyproject.toml:
#                                                       #   adds/drops packages, keeps every other pin
#   scripts/lock.sh --upgrade-package asyncssh==2.25.0  # move one package (see docs/upgrading-asyncssh.md)
#   scripts/lock.sh --check                             # exit 1 if the lock no longer matches pyproject.toml
#
# Other arguments go to pip-compile. pip-tools runs from a throwaway venv
# ($LOCK_TOOLS, default /tmp/bastion-lock-tools), never from .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${LOCK_TOOLS:-${TMPDIR:-/tmp}/bastion-lock-tools}"
PYTHON="${PYTHON:-python3}"
PIP_TOOLS_VERSION=7.6.2

step() { printf '[lock] %s\n' "$*"; }
fail() { printf '[lock] FAILED: %s\n' "$*" >&2; exit 1; }

check=0
args=()
for a in "$@"; do
  if [ "$a" = "--check" ]; then check=1; else args+=("$a"); fi
done

if ! "$TOOLS/bin/pip-compile" --version 2>/dev/null | grep -q "version $PIP_TOOLS_VERSION\$"; then
  step "creating $TOOLS with pip-tools $PIP_TOOLS_VERSION"
  "$PYTHON" -m venv "$TOOLS" || fail "python -m venv $TOOLS"
  "$TOOLS/bin/pip" install -q "pip-tools==$PIP_TOOLS_VERSION" || fail "pip install pip-tools"
fi

cd "$ROOT"
out=requirements.lock
if [ "$check" -eq 1 ]; then
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  out="$scratch/requirements.lock"
  [ -f requirements.lock ] && cp requirements.lock "$out"
fi

step "pip-compile --generate-hashes --extra test ${args[*]:-}"
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$TOOLS/bin/pip-compile" --quiet \
  --generate-hashes --extra test --strip-extras --no-emit-index-url --no-emit-find-links \
  --output-file "$out" ${args[@]+"${args[@]}"} pyproject.toml || fail "pip-compile"

if [ "$check" -eq 1 ]; then
  diff -u requirements.lock "$out" || fail "requirements.lock is stale: run scripts/lock.sh"
  step "requirements.lock matches pyproject.toml"
else
  step "wrote requirements.lock: $(grep -c '^[A-Za-z0-9]' requirements.lock) packages;" \
    "asyncssh $(sed -n 's/^asyncssh==\([^ ]*\).*/\1/p' requirements.lock)"
fi
