# Consul SERVER agent configuration for the bastion's directory -- secure by
# default. Copy to /etc/consul.d/ on each server (Debian's package reads that
# directory) and adapt datacenter, data_dir, bootstrap_expect and
# retry_join. Accepted by Consul 1.8.7 and by current Consul (1.2x):
# deliberately no `acl.tokens.initial_management` (1.8 rejects it; tokens are
# made by deploy/bootstrap-acl.sh instead) and no
# `acl.tokens.config_file_service_registration`.
#
# Not covered here, needed before a multi-host cluster carries real data:
# gossip encryption (`encrypt`, from `consul keygen`) and TLS for RPC and
# HTTPS (`tls`/`verify_*`, or `ca_file`/`cert_file`/`key_file` on 1.8).

datacenter = "dc1"
# ACLs are authoritative in this datacenter (ACL replication source).
primary_datacenter = "dc1"
data_dir = "/var/lib/consul"
server = true
# Number of servers to wait for before electing a leader: 1 for a single
# server, 3 or 5 in production.
bootstrap_expect = 1
# retry_join = ["consul-server-2", "consul-server-3"]

# HTTP API and DNS listen on loopback only. The CLI, the bastion and the
# script checks all run on the same host; nothing else needs them. Never
# 0.0.0.0: that hands the API (and with it any mistake in the ACLs) to the
# whole network.
client_addr = "127.0.0.1"

# Script checks: only those defined in files in this directory (the
# bastion's `bastion check` in ssh-bastion.hcl) may run. Never
# `enable_script_checks = true`: that lets anyone who can register a check
# through the HTTP API run commands as the consul user (a known
# remote-code-execution path, exploited in the wild).
enable_local_script_checks = true

# `consul exec` runs commands sent over the cluster: off.
disable_remote_exec = true

# Do not phone home to checkpoint.hashicorp.com.
disable_update_check = true

acl {
  enabled = true
  # Everything not granted by a token's policies is refused, including
  # requests without a token (see acl-policies/anonymous.hcl).
  default_policy = "deny"
  # If the servers cannot be reached, keep using cached token policies
  # (and refuse unknown tokens) rather than allowing or denying everything.
  down_policy = "extend-cache"
  # Keep tokens set with `consul acl set-agent-token` across restarts, so
  # no token needs to be written into this file.
  enable_token_persistence = true
}
