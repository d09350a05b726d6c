# Consul CLIENT agent configuration (every host that is not a Consul server:
# the bastion host and the target hosts) -- secure by default. Copy to
# /etc/consul.d/ and adapt datacenter, data_dir and retry_join. Accepted by
# Consul 1.8.7 and current Consul (1.2x); no `acl.tokens.initial_management`
# and no `acl.tokens.config_file_service_registration` (1.8 rejects both).
#
# After the agent joins, give it its agent token (node write on its own node
# only):  consul acl set-agent-token agent <secret>  -- see
# deploy/README-operators.md. With enable_token_persistence it survives
# restarts; no token is ever written into this file.
#
# Not covered here, needed before real data flows: gossip encryption
# (`encrypt`) and TLS (`verify_outgoing` etc., and the CA on 1.8).

datacenter = "dc1"
primary_datacenter = "dc1"
data_dir = "/var/lib/consul"
server = false
retry_join = ["consul-server-1"]

# HTTP API and DNS on loopback only: local processes (the bastion, the CLI,
# script checks) are the only clients.
client_addr = "127.0.0.1"

# Only script checks defined in local files (deploy/consul.d/ssh-bastion.hcl)
# may run; never `enable_script_checks` (remote code execution through the
# HTTP API).
enable_local_script_checks = true
disable_remote_exec = true
disable_update_check = true

acl {
  enabled = true
  default_policy = "deny"
  down_policy = "extend-cache"
  enable_token_persistence = true
}
