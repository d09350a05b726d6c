# Policy "bastion" -- used by the SSH bastion process (token: bastion.token).
#
# The bastion is the only piece of this system that faces the internet, so its
# token is the one most likely to leak. It may only READ the directory it
# routes by, and WRITE nothing but its own service registration. No KV
# writes, no ACL, no agent endpoints, no node writes, no other services.
#
# Managed by deploy/bootstrap-acl.sh (policy name = file name). Loads on
# Consul 1.8.7 and current Consul: no namespace/partition blocks.
# Prefixes are plain strings: "users/" does NOT cover "users" or
# "users-archive/".

# Routes: users/<name> = <node name> (e.g. users/alice = host-102).
# Blocking queries on users/?recurse need read on the prefix.
key_prefix "users/" {
  policy = "read"
}

# Users' authorized public keys (ssh-keys/<name>); operators write them.
key_prefix "ssh-keys/" {
  policy = "read"
}

# Upstream hosts' public host keys (host-keys/<node>), so the bastion can
# verify the host it relays to.
key_prefix "host-keys/" {
  policy = "read"
}

# Resolve a routed node name to its address (catalog) and see its health
# (node-level checks). Read only: the bastion can never (re)register a node.
node_prefix "" {
  policy = "read"
}

# Register, update and deregister its own service (and the service's checks),
# nothing else. Consul 1.8 also needs this on the token in the service
# definition (deploy/consul.d/ssh-bastion.hcl), or anti-entropy sync is
# "blocked by ACLs".
service "ssh-bastion" {
  policy = "write"
}

# Time-bound access grants (grants/<user>/<host>, `bastion grant`): read
# only. The bastion can neither write a grant nor create or destroy the
# Consul session that bounds one (no session rule at all).
key_prefix "grants/" {
  policy = "read"
}
