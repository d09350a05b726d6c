# Policy "operator" -- used by the people (or the automation) that manage the
# directory (token: operator.token): who lands on which host, which keys
# they log in with, and which host keys the bastion should trust.
#
#   consul kv put users/alice host-102
#   consul kv put ssh-keys/alice @id_ed25519.pub
#   consul kv put host-keys/host-102 @ssh_host_ed25519_key.pub
#   bastion grant alice host-103 --for 2h   (grants/, with a session)
#
# Nothing else: no ACL administration (that is the management token's job,
# kept offline), no services, no agent endpoints, no other KV prefixes.
#
# Managed by deploy/bootstrap-acl.sh. Loads on Consul 1.8.7 and current Consul.

# Routes: users/<name> = <node name>.
key_prefix "users/" {
  policy = "write"
}

# Users' authorized public keys.
key_prefix "ssh-keys/" {
  policy = "write"
}

# Upstream hosts' public host keys.
key_prefix "host-keys/" {
  policy = "write"
}

# Read the catalog to check that a route names a node that exists
# (`consul catalog nodes`, `consul members`).
node_prefix "" {
  policy = "read"
}

# Time-bound access grants (`bastion grant alice host-103 --for 2h`): each
# grant is a key under grants/ acquired by a Consul session with a TTL and
# Behavior "delete", so Consul deletes the key when the session ends.
key_prefix "grants/" {
  policy = "write"
}

# Create and destroy those sessions. Consul checks session rules against the
# node of the agent the request goes to; @AGENT_NODE@ is the agent this kit
# manages (deploy/bootstrap-acl.sh), so the token can make or end sessions
# there and nowhere else (not other applications' locks on other nodes).
# Run `bastion grant` against that agent ([consul] address).
session "@AGENT_NODE@" {
  policy = "write"
}
