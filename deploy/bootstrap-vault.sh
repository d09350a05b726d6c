#!/usr/bin/env bash
# Prepares Vault/OpenBao for the bastion: an SSH CA that signs one short-lived
# user certificate per login, KV v2 for the bastion's own secrets (its Consul
# token), the TOTP engine for the second factor (docs/mfa.md; the bastion may
# only check codes there), a narrow policy, and an AppRole the bastion logs in with.
#
#   VAULT_ADDR=https://vault:8200 VAULT_TOKEN=<admin token> \
#     deploy/bootstrap-vault.sh --out DIR [--ttl 5m] [--max-ttl 10m]
#
# Writes (DIR mode 0700, files 0600; the CA public key 0644):
#   DIR/role_id      AppRole role id      -> [vault] role_id_file
#   DIR/secret_id    AppRole secret id    -> [vault] secret_id_file
#   DIR/user_ca.pub  the SSH user CA      -> TrustedUserCAKeys on every target host
#
# Idempotent: a re-run changes nothing that exists. The CA is generated only
# once (OpenBao would otherwise add a new default issuer and every host would
# have to trust a new key); DIR/secret_id is kept while Vault still accepts it
# and replaced only when it does not. secret_id_ttl is 0 (no expiry): the
# secret id is a deployment credential, rotate it by deleting DIR/secret_id and
# re-running, then destroying the old one. Uses the `bao` CLI, or `vault` when
# that is what PATH has. Nothing secret is printed.
set -euo pipefail

MOUNT="ssh-client-signer"
ROLE="bastion"
POLICY="bastion"
APPROLE_MOUNT="approle"
KV_MOUNT="secret"
TOTP_MOUNT="totp"  # [access] totp_mount: the second factor's codes (docs/mfa.md)
EXTENSIONS="permit-pty,permit-user-rc,permit-agent-forwarding,permit-port-forwarding"

out=""
ttl="5m"
max_ttl="10m"

step() { printf '[bootstrap-vault] %s\n' "$*"; }
fail() { printf '[bootstrap-vault] FAILED: %s\n' "$*" >&2; exit 1; }
usage() {
  printf 'usage: %s --out DIR [--ttl 5m] [--max-ttl 10m]\n' "$0" >&2
  printf '  env: VAULT_ADDR, VAULT_TOKEN (an admin token)\n' >&2
  exit 2
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --out) [ "$#" -ge 2 ] || usage; out="$2"; shift 2 ;;
    --ttl) [ "$#" -ge 2 ] || usage; ttl="$2"; shift 2 ;;
    --max-ttl) [ "$#" -ge 2 ] || usage; max_ttl="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) printf 'unknown argument: %s\n' "$1" >&2; usage ;;
  esac
done
[ -n "$out" ] || usage
[ -n "${VAULT_ADDR:-}" ] || fail "VAULT_ADDR is not set"
[ -n "${VAULT_TOKEN:-}" ] || fail "VAULT_TOKEN is not set (an admin token)"
# bao reads VAULT_ADDR/VAULT_TOKEN too, but BAO_* would win over them
export BAO_ADDR="$VAULT_ADDR" BAO_TOKEN="$VAULT_TOKEN"

if command -v bao >/dev/null 2>&1; then
  cli=bao
elif command -v vault >/dev/null 2>&1; then
  cli=vault
else
  fail "neither bao nor vault is on PATH"
fi

errfile=$(mktemp)
trap 'rm -f "$errfile"' EXIT

# `v ARGS...`: run the CLI; on failure show its error (never a secret: no
# command here puts one on stderr) and stop.
v() {
  if ! "$cli" "$@" 2>"$errfile"; then
    fail "$cli $1 $2: $(tr '\n' ' ' <"$errfile")"
  fi
}

# `absent PATTERN ARGS...`: true when `CLI read ARGS` fails with PATTERN
# (the thing does not exist), false when it succeeds; any other failure
# (unreachable, permission denied) stops the script.
absent() {
  local pattern="$1"; shift
  if "$cli" read "$@" >/dev/null 2>"$errfile"; then
    return 1
  fi
  grep -qiE "$pattern" "$errfile" && return 0
  fail "$cli read $*: $(tr '\n' ' ' <"$errfile")"
}

step "using $cli at $VAULT_ADDR"
v token lookup >/dev/null

umask 077
mkdir -p "$out"
chmod 700 "$out"

# --- SSH CA ---------------------------------------------------------------
if absent "no secret engine mount" sys/mounts/"$MOUNT"; then
  v secrets enable -path="$MOUNT" -description="bastion: per-login SSH user certificates" ssh >/dev/null
  step "enabled ssh secrets engine at $MOUNT/"
else
  step "ssh secrets engine at $MOUNT/ present"
fi

# Vault says "keys haven't been configured yet", OpenBao "no default issuer"
if absent "no default issuer|haven't been configured|not configured" "$MOUNT"/config/ca; then
  # ed25519: small, fast, and no SHA-1 "ssh-rsa" signature for OpenSSH >= 8.8 to refuse
  v write "$MOUNT"/config/ca generate_signing_key=true key_type=ed25519 >/dev/null
  step "generated the SSH user CA (ed25519)"
else
  step "SSH user CA present (kept)"
fi

# --- signing role -----------------------------------------------------------
role_json=$(cat <<EOF
{
  "key_type": "ca",
  "allow_user_certificates": true,
  "allow_host_certificates": false,
  "allowed_users": "*",
  "allow_user_key_ids": true,
  "allowed_extensions": "$EXTENSIONS",
  "default_extensions": {
    "permit-pty": "",
    "permit-user-rc": "",
    "permit-agent-forwarding": "",
    "permit-port-forwarding": ""
  },
  "allowed_critical_options": "source-address",
  "ttl": "$ttl",
  "max_ttl": "$max_ttl"
}
EOF
)
printf '%s\n' "$role_json" | v write "$MOUNT"/roles/"$ROLE" - >/dev/null
step "wrote role $MOUNT/roles/$ROLE (ttl $ttl, max_ttl $max_ttl)"

# --- KV v2 for the bastion's secrets ----------------------------------------
if absent "no secret engine mount" sys/mounts/"$KV_MOUNT"; then
  v secrets enable -path="$KV_MOUNT" -version=2 kv >/dev/null
  step "enabled KV v2 at $KV_MOUNT/"
else
  kv_type=$("$cli" read -field=type sys/mounts/"$KV_MOUNT" 2>"$errfile") \
    || fail "read sys/mounts/$KV_MOUNT: $(tr '\n' ' ' <"$errfile")"
  kv_opts=$("$cli" read -format=json -field=options sys/mounts/"$KV_MOUNT" 2>"$errfile") \
    || fail "read sys/mounts/$KV_MOUNT: $(tr '\n' ' ' <"$errfile")"
  if [ "$kv_type" != "kv" ] || ! printf '%s' "$kv_opts" | grep -qE '"version": *"2"'; then
    # upgrading someone's KV v1 mount in place is not this script's call
    fail "$KV_MOUNT/ is mounted but is not KV version 2 (type $kv_type, options $kv_opts)"
  fi
  step "KV v2 at $KV_MOUNT/ present"
fi

# --- TOTP engine (the second factor; people are enrolled by operators) -------
if absent "no secret engine mount" sys/mounts/"$TOTP_MOUNT"; then
  v secrets enable -path="$TOTP_MOUNT" -description="bastion: second factor (TOTP)" totp >/dev/null
  step "enabled totp secrets engine at $TOTP_MOUNT/"
else
  step "totp secrets engine at $TOTP_MOUNT/ present"
fi

# --- policy -----------------------------------------------------------------
policy=$(cat <<EOF
# bastion: sign per-login certificates, read its own secrets, keep its token alive
path "$MOUNT/sign/$ROLE" {
  capabilities = ["update"]
}
path "$KV_MOUNT/data/bastion/*" {
  capabilities = ["read"]
}
# check a person's TOTP code (never read or create keys: operators enrol people)
path "$TOTP_MOUNT/code/*" {
  capabilities = ["update"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
EOF
)
printf '%s\n' "$policy" | v policy write "$POLICY" - >/dev/null
step "wrote policy $POLICY"

# --- AppRole ----------------------------------------------------------------
if absent "no auth engine at" sys/auth/"$APPROLE_MOUNT"; then
  v auth enable -path="$APPROLE_MOUNT" approle >/dev/null
  step "enabled approle auth at $APPROLE_MOUNT/"
else
  step "approle auth at $APPROLE_MOUNT/ present"
fi

v write auth/"$APPROLE_MOUNT"/role/"$ROLE" \
  token_policies="$POLICY" token_ttl=1h token_max_ttl=24h \
  secret_id_ttl=0 secret_id_num_uses=0 >/dev/null
step "wrote approle role $ROLE (token ttl 1h, max 24h; secret id does not expire)"

role_id=$("$cli" read -field=role_id auth/"$APPROLE_MOUNT"/role/"$ROLE"/role-id 2>"$errfile") \
  || fail "read role-id: $(tr '\n' ' ' <"$errfile")"
printf '%s\n' "$role_id" >"$out/role_id.tmp"
chmod 600 "$out/role_id.tmp"
mv -f "$out/role_id.tmp" "$out/role_id"
step "wrote $out/role_id"

secret_id_valid() {
  local sid lookup
  [ -s "$out/secret_id" ] || return 1
  sid=$(tr -d '[:space:]' <"$out/secret_id")
  # on stdin, not argv: other users can read a process's arguments
  lookup=$(printf '%s' "$sid" | "$cli" write -format=json \
    auth/"$APPROLE_MOUNT"/role/"$ROLE"/secret-id/lookup secret_id=- 2>/dev/null) || return 1
  printf '%s' "$lookup" | grep -q '"secret_id_accessor"'
}

if secret_id_valid; then
  chmod 600 "$out/secret_id"
  step "kept $out/secret_id (still valid)"
else
  secret_id=$("$cli" write -f -field=secret_id auth/"$APPROLE_MOUNT"/role/"$ROLE"/secret-id \
    2>"$errfile") || fail "create secret-id: $(tr '\n' ' ' <"$errfile")"
  printf '%s\n' "$secret_id" >"$out/secret_id.tmp"
  unset secret_id
  chmod 600 "$out/secret_id.tmp"
  mv -f "$out/secret_id.tmp" "$out/secret_id"
  step "wrote $out/secret_id (new secret id)"
fi

# --- the CA public key, for the hosts ----------------------------------------
# the same key GET /v1/$MOUNT/public_key serves (that endpoint is raw text, not JSON)
ca_pub=$("$cli" read -field=public_key "$MOUNT"/config/ca 2>"$errfile") \
  || fail "read CA public key: $(tr '\n' ' ' <"$errfile")"
case "$ca_pub" in
  ssh-*|ecdsa-*) ;;
  *) fail "unexpected CA public key from $MOUNT/config/ca" ;;
esac
printf '%s\n' "$ca_pub" >"$out/user_ca.pub.tmp"
chmod 644 "$out/user_ca.pub.tmp"
mv -f "$out/user_ca.pub.tmp" "$out/user_ca.pub"
step "wrote $out/user_ca.pub (TrustedUserCAKeys for the target hosts)"
step "done"
