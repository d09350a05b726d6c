#!/usr/bin/env bash
# Secures a Consul datacenter for the SSH bastion: ACL policies, one token
# per actor, the anonymous token and the agent token. Idempotent: a re-run
# changes nothing unless something drifted, and then it repairs it.
#
#   deploy/bootstrap-acl.sh --out DIR [--policies DIR] [--agent-node NAME]
#                           [--management-token-file FILE] [--vault-path PATH]
#                           [--anonymous-dns] [--print-secrets]
#
# Consul:  CONSUL_HTTP_ADDR (default http://127.0.0.1:8500); CONSUL_CACERT,
#          CONSUL_CLIENT_CERT/KEY etc. are honoured by the consul CLI.
# Management token, first found of: --management-token-file FILE (copied to
#          DIR/management.token), CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE,
#          DIR/management.token. None and the cluster never bootstrapped: it
#          runs `consul acl bootstrap` (retrying ~30 s while a new server is
#          still in "legacy mode") and keeps the token in DIR/management.token.
#          Move that file somewhere offline once you are done.
#
# What it does:
#   - every acl-policies/NAME.hcl becomes policy NAME (created, or updated by
#     ID when its rules or description differ); @AGENT_NODE@ in a file is
#     replaced by the agent's node name (agent-reload.hcl)
#   - tokens, each with a persisted accessor and secret (DIR/ACTOR.accessor,
#     DIR/ACTOR.token: the SecretID and a newline, mode 0600, DIR 0700):
#       bastion   policy bastion
#       operator  policy operator
#       agent     node identity NODE:DC (node write on its own node, service
#                 read), set on the agent with `consul acl set-agent-token`
#       agent-reload  policy agent-reload (agent write on NODE: `consul reload`
#                 for `bastion register`)
#     A token whose links or description differ is reset to exactly the
#     intended list (1.8's `token update` clears what is not passed; current
#     Consul keeps it -- so the result is re-read and, if still wrong, the
#     token is deleted and re-created with the same accessor and secret).
#   - the anonymous token gets policy "anonymous" (deny all), or with
#     --anonymous-dns policy "anonymous-dns" (node/service read for DNS).
#   - --vault-path PATH (VAULT_ADDR, VAULT_TOKEN): the bastion token is stored
#     in Vault/OpenBao KV v2 at PATH, field "token" (bao or vault CLI, else
#     curl; PATH's first component is taken as the KV v2 mount with curl).
#
# Needs: bash, coreutils (timeout, mktemp), sed, awk, the consul CLI, and curl
# or python3 for the HTTP API. Secrets never go to stdout/stderr unless
# --print-secrets, and never into a process's arguments: tokens are created
# and the agent token set over the HTTP API, with the management token in a
# header read from a pipe and the body on stdin. (Without curl and python3 the
# consul CLI is used instead; its `acl token create -secret` and `acl
# set-agent-token` take the secret as an argument, visible in the process
# list for the few milliseconds they run; pass --agent-node then, too.)
set -euo pipefail
umask 077
export LC_ALL=C

PROG="bootstrap-acl"
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POLICIES_DIR="$DEPLOY_DIR/../acl-policies"
OUT_DIR=""
AGENT_NODE=""
VAULT_PATH=""
MGMT_FILE=""
PRINT_SECRETS=0
ANON_POLICY="anonymous"
WAIT_SECONDS="${BOOTSTRAP_ACL_WAIT_SECONDS:-30}"
CALL_TIMEOUT=30
ANON_ACCESSOR="00000000-0000-0000-0000-000000000002"
CONSUL_ADDR="${CONSUL_HTTP_ADDR:-http://127.0.0.1:8500}"

say() { printf '[%s] %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
words() { if [ -n "$1" ]; then printf '%s' "$1" | tr '\n' ' ' | sed 's/ $//'; else printf 'none'; fi; }
oneline() { tr '\n\t' '  ' | sed -e 's/  */ /g' -e 's/^ //' -e 's/ $//' | cut -c1-400; }

usage() {
  cat <<'EOF'
usage: deploy/bootstrap-acl.sh --out DIR [--policies DIR] [--agent-node NAME]
                               [--management-token-file FILE] [--vault-path PATH]
                               [--anonymous-dns] [--print-secrets]
Consul address: CONSUL_HTTP_ADDR (default http://127.0.0.1:8500).
Management token: --management-token-file, CONSUL_HTTP_TOKEN(_FILE), DIR/management.token,
or a fresh `consul acl bootstrap` when the cluster was never bootstrapped.
EOF
}

# --- arguments --------------------------------------------------------------
need_arg() { [[ "$#" -ge 2 && -n "${2:-}" ]] || die "$1 needs a value (see --help)"; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --out) need_arg "$@"; OUT_DIR="$2"; shift 2 ;;
    --out=*) OUT_DIR="${1#*=}"; shift ;;
    --policies) need_arg "$@"; POLICIES_DIR="$2"; shift 2 ;;
    --policies=*) POLICIES_DIR="${1#*=}"; shift ;;
    --agent-node) need_arg "$@"; AGENT_NODE="$2"; shift 2 ;;
    --agent-node=*) AGENT_NODE="${1#*=}"; shift ;;
    --management-token-file) need_arg "$@"; MGMT_FILE="$2"; shift 2 ;;
    --management-token-file=*) MGMT_FILE="${1#*=}"; shift ;;
    --vault-path) need_arg "$@"; VAULT_PATH="$2"; shift 2 ;;
    --vault-path=*) VAULT_PATH="${1#*=}"; shift ;;
    --anonymous-dns) ANON_POLICY="anonymous-dns"; shift ;;
    --print-secrets) PRINT_SECRETS=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ -n "$OUT_DIR" ] || { usage >&2; die "--out DIR is required"; }
command -v consul >/dev/null 2>&1 || die "the consul CLI is not on PATH"
[ -d "$POLICIES_DIR" ] || die "policies directory not found: $POLICIES_DIR"
POLICIES_DIR="$(cd "$POLICIES_DIR" && pwd)"
for p in bastion operator agent-reload "$ANON_POLICY"; do
  [ -f "$POLICIES_DIR/$p.hcl" ] || die "missing policy file $POLICIES_DIR/$p.hcl"
done
if [ -n "$VAULT_PATH" ]; then
  [[ -n "${VAULT_ADDR:-}" && -n "${VAULT_TOKEN:-}" ]] \
    || die "--vault-path needs VAULT_ADDR and VAULT_TOKEN in the environment"
fi
case "$WAIT_SECONDS" in ''|*[!0-9]*) die "BOOTSTRAP_ACL_WAIT_SECONDS must be a number" ;; esac

# --- helpers ----------------------------------------------------------------
# The consul CLI, bounded in time. The token (if any) comes from the exported
# CONSUL_HTTP_TOKEN, never from the command line.
c() { timeout "$CALL_TIMEOUT" consul "$@"; }

# The first line of stdin. Reads all of it: with pipefail, a reader that quits
# early (head) can kill a writer with SIGPIPE and fail the whole pipeline.
first_line() { awk 'NR == 1'; }

# First `"FIELD": "value"` line of the CLI's indented JSON (the top-level one
# for the fields used here), unescaped only as far as this script needs.
json_field() { sed -n 's/^ *"'"$1"'": "\(.*\)",\{0,1\}$/\1/p' | first_line; }

is_uuid() {
  [[ "$1" =~ ^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$ ]]
}

new_uuid() {
  if [ -r /proc/sys/kernel/random/uuid ]; then
    cat /proc/sys/kernel/random/uuid
  elif command -v uuidgen >/dev/null 2>&1; then
    uuidgen -r
  else
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n' \
      | sed -E 's/^(.{8})(.{4}).(.{3}).(.{3})(.{12})$/\1-\2-4\3-a\4-\5/'
  fi
}

# write_secret FILE VALUE: atomically, mode 0600, VALUE and a newline.
# printf is a builtin: the value never appears on a command line.
write_secret() {
  local tmp
  tmp="$(mktemp "$1.XXXXXX")"
  printf '%s\n' "$2" > "$tmp"
  chmod 600 "$tmp"
  mv -f "$tmp" "$1"
}

read_token_file() {
  local v
  [ -r "$1" ] || die "cannot read token file $1"
  v="$(tr -d ' \t\r\n' < "$1")"
  [ -n "$v" ] || die "token file $1 is empty"
  printf '%s' "$v"
}

# load_id FILE: the UUID persisted in FILE, or a new one persisted there.
load_id() {
  local v
  if [ -s "$1" ]; then
    v="$(tr -d ' \t\r\n' < "$1")"
    is_uuid "$v" || die "$1 does not hold a UUID"
    chmod 600 "$1"
  else
    v="$(new_uuid)"
    is_uuid "$v" || die "could not generate a UUID"
    write_secret "$1" "$v"
  fi
  printf '%s' "$v"
}

retryable() {
  case "$1" in
    *"legacy mode"*|*"No cluster leader"*|*"ACL system"*"not"*"ready"*|*"rpc error"*) return 0 ;;
    *"Unexpected response code: 5"[0-9][0-9]*) return 0 ;;
  esac
  return 1
}

# consul_url PATH: the URL of PATH on the agent (fails for a unix socket).
consul_url() {
  local addr="$CONSUL_ADDR"
  case "$addr" in
    http://*|https://*) printf '%s%s\n' "${addr%/}" "$1" ;;
    unix://*) return 1 ;;
    *) if [ "${CONSUL_HTTP_SSL:-}" = "true" ]; then printf 'https://%s%s\n' "$addr" "$1"
       else printf 'http://%s%s\n' "$addr" "$1"; fi ;;
  esac
}

# curl's TLS options from the CONSUL_* variables (into the array TLS_ARGS).
tls_args() {
  TLS_ARGS=()
  [ -n "${CONSUL_CACERT:-}" ] && TLS_ARGS+=(--cacert "$CONSUL_CACERT")
  [ -n "${CONSUL_CLIENT_CERT:-}" ] && TLS_ARGS+=(--cert "$CONSUL_CLIENT_CERT")
  [ -n "${CONSUL_CLIENT_KEY:-}" ] && TLS_ARGS+=(--key "$CONSUL_CLIENT_KEY")
  [ "${CONSUL_HTTP_SSL_VERIFY:-true}" = "false" ] && TLS_ARGS+=(-k)
  return 0
}

# http_send METHOD PATH < BODY: Consul's answer on stdout, status 0 for a 2xx
# answer, 1 for an error (Consul's error text is the output), 2 when there is
# neither curl nor python3. The management token goes in a header read from a
# pipe, the body (which may hold a secret) on stdin: neither is ever in a
# process's arguments.
http_send() {
  local method="$1" url resp code
  url="$(consul_url "$2")" || return 2
  if command -v curl >/dev/null 2>&1; then
    tls_args
    resp="$(curl -sS --max-time 10 -X "$method" "${TLS_ARGS[@]}" --data-binary @- \
              -H @<(printf 'X-Consul-Token: %s\n' "$CONSUL_HTTP_TOKEN") \
              -w '\n%{http_code}' "$url" 2>&1)" || { printf '%s\n' "$resp"; return 1; }
  elif command -v python3 >/dev/null 2>&1; then
    resp="$(python3 -c '
import os, ssl, sys, urllib.error, urllib.request
ctx = ssl.create_default_context(cafile=os.environ.get("CONSUL_CACERT") or None)
req = urllib.request.Request(sys.argv[2], data=sys.stdin.buffer.read(), method=sys.argv[1],
                             headers={"X-Consul-Token": os.environ["CONSUL_HTTP_TOKEN"]})
try:
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        body, code = r.read().decode(), r.status
except urllib.error.HTTPError as e:
    body, code = e.read().decode(), e.code
sys.stdout.write(body + "\n" + str(code))
' "$method" "$url" 2>&1)" || { printf '%s\n' "$resp"; return 1; }
  else
    return 2
  fi
  code="${resp##*$'\n'}"
  printf '%s\n' "${resp%$'\n'*}"
  [[ "$code" == 2?? ]]
}

# json_str VALUE: VALUE as a JSON string (quotes and backslashes escaped).
json_str() {
  local v="${1//\\/\\\\}"
  v="${v//\"/\\\"}"
  printf '"%s"' "$v"
}

# token_body ACCESSOR SECRET DESCRIPTION LINK...: the JSON for PUT /v1/acl/token.
token_body() {
  local acc="$1" sec="$2" desc="$3" l n policies="" nodes=""
  shift 3
  for l in "$@"; do
    case "$l" in
      policy:*) policies+="${policies:+,}{\"Name\":$(json_str "${l#policy:}")}" ;;
      node:*) n="${l#node:}"
              nodes+="${nodes:+,}{\"NodeName\":$(json_str "${n%%:*}"),\"Datacenter\":$(json_str "${n#*:}")}" ;;
      *) die "internal: bad link $l" ;;
    esac
  done
  printf '{"AccessorID":%s,"SecretID":%s,"Description":%s,"Policies":[%s],"NodeIdentities":[%s]}\n' \
    "$(json_str "$acc")" "$(json_str "$sec")" "$(json_str "$desc")" "$policies" "$nodes"
}

# create_token ACCESSOR SECRET DESCRIPTION LINK...: Consul's answer (or error
# text) on stdout; the HTTP API, or the CLI when there is no HTTP client.
create_token() {
  local acc="$1" sec="$2" desc="$3" rc=0
  shift 3
  token_body "$acc" "$sec" "$desc" "$@" | http_send PUT /v1/acl/token || rc=$?
  if [ "$rc" -eq 2 ]; then
    link_args "$@"
    c acl token create -accessor "$acc" -secret "$sec" -description "$desc" \
      "${LINK_ARGS[@]}" 2>&1 || return 1
    return 0
  fi
  return "$rc"
}

# GET a Consul HTTP path with the management token (curl, else python3).
http_get() {
  local url
  url="$(consul_url "$1")" || return 1
  if command -v curl >/dev/null 2>&1; then
    tls_args
    printf 'X-Consul-Token: %s\n' "$CONSUL_HTTP_TOKEN" \
      | curl -sS --fail --max-time 10 -H @- "${TLS_ARGS[@]}" "$url"
  elif command -v python3 >/dev/null 2>&1; then
    python3 - "$url" <<'PY'
import os, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=os.environ.get("CONSUL_CACERT") or None)
req = urllib.request.Request(sys.argv[1], headers={"X-Consul-Token": os.environ["CONSUL_HTTP_TOKEN"]})
with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
    sys.stdout.write(resp.read().decode())
PY
  else
    return 1
  fi
}

# Links of a token from `consul acl token read -format=json`, one per line,
# sorted: policy:NAME, node:NAME:DC, other:... (roles, service identities).
token_links() {
  awk '
    function val(s) { sub(/^[^:]*: "/, "", s); sub(/",?[ \t\r]*$/, "", s); return s }
    /^ *"Policies": \[/          { sec = "policy"; next }
    /^ *"NodeIdentities": \[/    { sec = "node"; next }
    /^ *"(Roles|ServiceIdentities)": \[/ { sec = "other"; next }
    /^ *\],?[ \t\r]*$/           { sec = ""; next }
    sec == "policy" && /^ *"Name": "/     { print "policy:" val($0) }
    sec == "node"   && /^ *"NodeName": "/ { node = val($0) }
    sec == "node"   && /^ *"Datacenter": "/ { print "node:" node ":" val($0) }
    sec == "other"  && /^ *"(Name|ServiceName)": "/ { print "other:" val($0) }
  ' | sort
}

link_args() {  # intended links -> consul CLI flags (into the array LINK_ARGS)
  LINK_ARGS=()
  local l
  for l in "$@"; do
    case "$l" in
      policy:*) LINK_ARGS+=(-policy-name "${l#policy:}") ;;
      node:*) LINK_ARGS+=(-node-identity "${l#node:}") ;;
      *) die "internal: bad link $l" ;;
    esac
  done
}

# --- 1. Consul reachable? -----------------------------------------------------
mkdir -p "$OUT_DIR"
chmod 700 "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export CONSUL_HTTP_ADDR="$CONSUL_ADDR"

if ! dcs="$(env -u CONSUL_HTTP_TOKEN -u CONSUL_HTTP_TOKEN_FILE \
            timeout 15 consul catalog datacenters 2>&1)"; then
  die "Consul is unreachable at $CONSUL_ADDR: $(printf '%s' "$dcs" | oneline)"
fi
say "consul: reachable at $CONSUL_ADDR (datacenters: $(printf '%s' "$dcs" | oneline))"

# --- 2. management token ------------------------------------------------------
MGMT=""
MGMT_SRC=""
if [ -n "$MGMT_FILE" ]; then
  MGMT="$(read_token_file "$MGMT_FILE")"
  MGMT_SRC="file $MGMT_FILE"
elif [ -n "${CONSUL_HTTP_TOKEN:-}" ]; then
  MGMT="$CONSUL_HTTP_TOKEN"
  MGMT_SRC="CONSUL_HTTP_TOKEN"
elif [ -n "${CONSUL_HTTP_TOKEN_FILE:-}" ]; then
  MGMT="$(read_token_file "$CONSUL_HTTP_TOKEN_FILE")"
  MGMT_SRC="CONSUL_HTTP_TOKEN_FILE"
elif [ -s "$OUT_DIR/management.token" ]; then
  MGMT="$(read_token_file "$OUT_DIR/management.token")"
  MGMT_SRC="$OUT_DIR/management.token"
fi
unset CONSUL_HTTP_TOKEN_FILE
unset CONSUL_HTTP_TOKEN

deadline=$((SECONDS + WAIT_SECONDS))
waited=0
wait_note() {  # one progress line for the whole wait
  [ "$waited" -eq 1 ] && return 0
  waited=1
  say "consul: ACL system not ready yet ($(printf '%s' "$1" | oneline | cut -c1-120)), retrying for up to ${WAIT_SECONDS}s"
}
if [ -z "$MGMT" ]; then
  while :; do
    if out="$(c acl bootstrap -format=json 2>&1)"; then
      MGMT="$(printf '%s\n' "$out" | json_field SecretID)"
      is_uuid "$MGMT" || die "consul acl bootstrap returned no SecretID"
      write_secret "$OUT_DIR/management.token" "$MGMT"
      MGMT_SRC="bootstrap"
      say "management token: bootstrapped the ACL system -> $OUT_DIR/management.token (keep it offline)"
      break
    fi
    case "$out" in
      *"no longer allowed"*)
        die "ACLs at $CONSUL_ADDR are already bootstrapped and no management token was given: set CONSUL_HTTP_TOKEN, pass --management-token-file FILE or put it in $OUT_DIR/management.token" ;;
      *"ACL support disabled"*)
        die "ACLs are disabled on $CONSUL_ADDR: enable them (acl { enabled = true }, see deploy/consul.d/) and restart Consul" ;;
    esac
    retryable "$out" || die "consul acl bootstrap failed: $(printf '%s' "$out" | oneline)"
    wait_note "$out"
    [ "$SECONDS" -lt "$deadline" ] \
      || die "Consul at $CONSUL_ADDR still refuses ACL bootstrap after ${WAIT_SECONDS}s: $(printf '%s' "$out" | oneline)"
    sleep 0.5
  done
fi
export CONSUL_HTTP_TOKEN="$MGMT"

# The token must be known (and the ACL system out of legacy mode).
while :; do
  if out="$(c acl token read -self -format=json 2>&1)"; then break; fi
  case "$out" in
    *"ACL not found"*)
      hint=""
      [ "$MGMT_SRC" = "$OUT_DIR/management.token" ] \
        && hint=" (a stale token from another cluster? remove the file to bootstrap a fresh cluster)"
      die "the management token from $MGMT_SRC was rejected by Consul at $CONSUL_ADDR: 403 ACL not found$hint" ;;
    *"ACL support disabled"*)
      die "ACLs are disabled on $CONSUL_ADDR: enable them (acl { enabled = true }, see deploy/consul.d/) and restart Consul" ;;
  esac
  retryable "$out" || die "cannot verify the management token: $(printf '%s' "$out" | oneline)"
  wait_note "$out"
  [ "$SECONDS" -lt "$deadline" ] \
    || die "Consul at $CONSUL_ADDR not ready after ${WAIT_SECONDS}s: $(printf '%s' "$out" | oneline)"
  sleep 0.5
done
if ! policy_list="$(c acl policy list -format=json 2>&1)"; then
  case "$policy_list" in
    *"Permission denied"*) die "the token from $MGMT_SRC may not manage ACLs (403 Permission denied): use the management token" ;;
  esac
  die "cannot list ACL policies: $(printf '%s' "$policy_list" | oneline)"
fi
if [ "$MGMT_SRC" != "bootstrap" ]; then
  say "management token: from $MGMT_SRC, accepted"
  if [ -n "$MGMT_FILE" ]; then
    kept=""
    [ -s "$OUT_DIR/management.token" ] && kept="$(tr -d ' \t\r\n' < "$OUT_DIR/management.token")"
    if [ "$kept" != "$MGMT" ]; then
      write_secret "$OUT_DIR/management.token" "$MGMT"
      say "management token: copied to $OUT_DIR/management.token (keep it offline)"
    fi
  fi
fi

# --- 3. the agent's node (policies may be templated with it) and policies -------
agent_dc=""
if self_json="$(http_get '/v1/agent/self?pretty' 2>/dev/null)"; then
  [ -n "$AGENT_NODE" ] || AGENT_NODE="$(printf '%s\n' "$self_json" | json_field NodeName)"
  agent_dc="$(printf '%s\n' "$self_json" | json_field Datacenter)"
fi
[ -n "$AGENT_NODE" ] \
  || die "cannot read the agent's node name from $CONSUL_ADDR/v1/agent/self (needs curl or python3): pass --agent-node NAME"
[ -n "$agent_dc" ] || agent_dc="$(printf '%s\n' "$dcs" | first_line)"
[[ "$AGENT_NODE" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ ]] \
  || die "agent node name must be [A-Za-z0-9._-] to go into a policy: $AGENT_NODE"

policy_id() {
  printf '%s\n' "$policy_list" | awk -v want="$1" '
    function val(s) { sub(/^[^:]*: "/, "", s); sub(/",?[ \t\r]*$/, "", s); return s }
    /^ *"ID": "/   { id = val($0) }
    /^ *"Name": "/ { if (!found && val($0) == want) { print id; found = 1 } }'
}

shopt -s nullglob
policy_files=("$POLICIES_DIR"/*.hcl)
shopt -u nullglob
for f in "${policy_files[@]}"; do
  name="$(basename "$f" .hcl)"
  [[ "$name" =~ ^[A-Za-z0-9_-]{1,128}$ ]] || die "policy file name must be [A-Za-z0-9_-]: $f"
  desc="bastion ACL kit: $name.hcl (managed by deploy/bootstrap-acl.sh)"
  want_rules="$(cat "$f")"
  [ -n "$want_rules" ] || die "policy file is empty: $f"
  want_rules="${want_rules//@AGENT_NODE@/$AGENT_NODE}"
  id="$(policy_id "$name")"
  if [ -z "$id" ]; then
    out="$(printf '%s\n' "$want_rules" \
           | c acl policy create -name "$name" -description "$desc" -rules - 2>&1)" \
      || die "creating policy $name from $f failed: $(printf '%s' "$out" | oneline)"
    say "policy $name: created from $f"
    continue
  fi
  cur="$(c acl policy read -id "$id" 2>&1)" \
    || die "reading policy $name failed: $(printf '%s' "$cur" | oneline)"
  # pretty output: header lines, then "Rules:" and the rules verbatim
  cur_rules="$(printf '%s\n' "$cur" | sed '1,/^Rules:$/d')"
  cur_desc="$(printf '%s\n' "$cur" | sed -n 's/^Description: *//p' | first_line)"
  if [ "$cur_rules" = "$want_rules" ] && [ "$cur_desc" = "$desc" ]; then
    say "policy $name: unchanged"
  else
    # by ID: on Consul 1.8, `-name` would rename a policy, not select it
    out="$(printf '%s\n' "$want_rules" \
           | c acl policy update -id "$id" -name "$name" -description "$desc" -rules - 2>&1)" \
      || die "updating policy $name failed: $(printf '%s' "$out" | oneline)"
    say "policy $name: updated from $f (rules or description had drifted)"
  fi
done

# --- 4. tokens -------------------------------------------------------------------
# read_token ACCESSOR -> sets TOKEN_JSON; returns 1 if no such token.
read_token() {
  if TOKEN_JSON="$(c acl token read -id "$1" -format=json 2>&1)"; then return 0; fi
  case "$TOKEN_JSON" in
    *"ACL not found"*|*"not found"*|*"404"*) return 1 ;;
  esac
  die "reading token $1 failed: $(printf '%s' "$TOKEN_JSON" | oneline)"
}

# ensure_token ACTOR DESCRIPTION LINK...  (links: policy:NAME, node:NAME:DC)
ensure_token() {
  local actor="$1" desc="$2"
  shift 2
  local acc_file="$OUT_DIR/$actor.accessor" sec_file="$OUT_DIR/$actor.token"
  local acc sec want have cur_desc out
  acc="$(load_id "$acc_file")"
  sec="$(load_id "$sec_file")"
  want="$(printf '%s\n' "$@" | sort)"
  link_args "$@"
  if ! read_token "$acc"; then
    if ! out="$(create_token "$acc" "$sec" "$desc" "$@")"; then
      case "$out" in
        *"already in use"*|*"already exists"*)
          die "creating token $actor: its secret in $sec_file already belongs to another token (restore $acc_file, or remove both files to make a new token)" ;;
      esac
      die "creating token $actor failed: $(printf '%s' "$out" | oneline)"
    fi
    say "token $actor: created (accessor $acc) -> $sec_file"
    return 0
  fi
  [ "$(printf '%s\n' "$TOKEN_JSON" | json_field SecretID)" = "$sec" ] \
    || die "token $actor (accessor $acc) exists with a different secret than $sec_file: restore that file, or delete the token (consul acl token delete -id $acc) and re-run"
  have="$(printf '%s\n' "$TOKEN_JSON" | token_links)"
  cur_desc="$(printf '%s\n' "$TOKEN_JSON" | json_field Description)"
  if [ "$have" = "$want" ] && [ "$cur_desc" = "$desc" ]; then
    say "token $actor: unchanged -> $sec_file"
    return 0
  fi
  # Always the full intended list: on 1.8 an omitted kind of link is cleared.
  out="$(c acl token update -id "$acc" -description "$desc" "${LINK_ARGS[@]}" 2>&1)" \
    || die "updating token $actor failed: $(printf '%s' "$out" | oneline)"
  read_token "$acc" || die "token $actor vanished during update"
  if [ "$(printf '%s\n' "$TOKEN_JSON" | token_links)" != "$want" ]; then
    # current Consul keeps links a `token update` does not mention
    out="$(c acl token delete -id "$acc" 2>&1)" \
      || die "deleting token $actor for re-creation failed: $(printf '%s' "$out" | oneline)"
    out="$(create_token "$acc" "$sec" "$desc" "$@")" \
      || die "re-creating token $actor failed: $(printf '%s' "$out" | oneline)"
  fi
  say "token $actor: reset to $(words "$want") (had: $(words "$have")) -> $sec_file"
}

# anonymous: built in, cannot be re-created; only its policy links are ours.
read_token "$ANON_ACCESSOR" || die "the anonymous token does not exist (is this a Consul >= 1.4 ACL system?)"
have="$(printf '%s\n' "$TOKEN_JSON" | token_links)"
if [ "$have" = "policy:$ANON_POLICY" ]; then
  say "token anonymous: unchanged (policy $ANON_POLICY)"
else
  out="$(c acl token update -id "$ANON_ACCESSOR" -policy-name "$ANON_POLICY" 2>&1)" \
    || die "updating the anonymous token failed: $(printf '%s' "$out" | oneline)"
  read_token "$ANON_ACCESSOR" || die "the anonymous token vanished"
  [ "$(printf '%s\n' "$TOKEN_JSON" | token_links)" = "policy:$ANON_POLICY" ] \
    || die "the anonymous token still has other links after update: $(printf '%s\n' "$TOKEN_JSON" | token_links | tr '\n' ' ')"
  say "token anonymous: set to policy $ANON_POLICY (had: $(words "$have"))"
fi

ensure_token bastion "bastion: SSH bastion, reads routes and keys, registers ssh-bastion" \
  policy:bastion
ensure_token operator "operator: manages routes, user keys and host keys" policy:operator

ensure_token agent "agent: Consul agent on node $AGENT_NODE (node identity)" \
  "node:$AGENT_NODE:$agent_dc"
ensure_token agent-reload "agent-reload: reloads the Consul agent on node $AGENT_NODE (bastion register)" \
  policy:agent-reload
agent_secret="$(tr -d ' \t\r\n' < "$OUT_DIR/agent.token")"
rc=0
out="$(printf '{"Token":%s}\n' "$(json_str "$agent_secret")" \
       | http_send PUT /v1/agent/token/agent)" || rc=$?
if [ "$rc" -eq 2 ]; then  # no HTTP client: the CLI (the secret briefly in its arguments)
  rc=0
  out="$(c acl set-agent-token agent "$agent_secret" 2>&1)" || rc=$?
fi
[ "$rc" -eq 0 ] || die "setting the agent token failed: $(printf '%s' "$out" | oneline)"
say "agent token: set on the agent at $CONSUL_ADDR (node $AGENT_NODE, datacenter $agent_dc)"

# --- 5. Vault / OpenBao -------------------------------------------------------
if [ -n "$VAULT_PATH" ]; then
  bastion_secret="$(tr -d ' \t\r\n' < "$OUT_DIR/bastion.token")"
  vcli=""
  for v in bao vault; do
    if command -v "$v" >/dev/null 2>&1; then vcli="$v"; break; fi
  done
  if [ -n "$vcli" ]; then
    export BAO_ADDR="${BAO_ADDR:-$VAULT_ADDR}" BAO_TOKEN="${BAO_TOKEN:-$VAULT_TOKEN}"
    stored="$(timeout "$CALL_TIMEOUT" "$vcli" kv get -field=token "$VAULT_PATH" 2>/dev/null)" || stored=""
    if [ "$stored" = "$bastion_secret" ]; then
      say "vault: bastion token already at $VAULT_PATH (field token), unchanged"
    else
      out="$(printf '%s' "$bastion_secret" \
             | timeout "$CALL_TIMEOUT" "$vcli" kv put "$VAULT_PATH" token=- 2>&1)" \
        || die "$vcli kv put $VAULT_PATH failed: $(printf '%s' "$out" | oneline)"
      say "vault: bastion token stored at $VAULT_PATH (field token, $vcli)"
    fi
  elif command -v curl >/dev/null 2>&1; then
    mount="${VAULT_PATH%%/*}"
    rest="${VAULT_PATH#*/}"
    [[ -n "$mount" && "$rest" != "$VAULT_PATH" && -n "$rest" ]] \
      || die "--vault-path must be MOUNT/PATH (KV v2), e.g. secret/bastion/consul"
    url="${VAULT_ADDR%/}/v1/$mount/data/$rest"
    hdr="$(mktemp)"
    trap 'rm -f "$hdr"' EXIT
    printf 'X-Vault-Token: %s\n' "$VAULT_TOKEN" > "$hdr"
    cacert=()
    [ -n "${VAULT_CACERT:-}" ] && cacert=(--cacert "$VAULT_CACERT")
    stored="$(curl -sS --fail --max-time 10 "${cacert[@]}" -H "@$hdr" "$url" 2>/dev/null \
              | sed -n 's/.*"data":{"data":{[^}]*"token":"\([^"]*\)".*/\1/p')" || stored=""
    if [ "$stored" = "$bastion_secret" ]; then
      say "vault: bastion token already at $VAULT_PATH (field token), unchanged"
    else
      out="$(printf '{"data":{"token":"%s"}}' "$bastion_secret" \
             | curl -sS --fail --max-time 10 "${cacert[@]}" -H "@$hdr" \
                    -H 'Content-Type: application/json' -X POST --data-binary @- "$url" 2>&1)" \
        || die "storing the bastion token at $url failed: $(printf '%s' "$out" | oneline)"
      say "vault: bastion token stored at $VAULT_PATH (field token, curl)"
    fi
  else
    die "--vault-path needs the bao or vault CLI, or curl"
  fi
fi

# --- 6. summary -----------------------------------------------------------------
files=""
for t in management bastion operator agent agent-reload; do
  [ -s "$OUT_DIR/$t.token" ] && files="$files $t.token"
done
say "done: token files (mode 0600) in $OUT_DIR:$files"
if [ "$PRINT_SECRETS" -eq 1 ]; then
  for t in management bastion operator agent agent-reload; do
    [ -s "$OUT_DIR/$t.token" ] && printf '%s.token: %s\n' "$t" "$(tr -d ' \t\r\n' < "$OUT_DIR/$t.token")"
  done
fi
exit 0
