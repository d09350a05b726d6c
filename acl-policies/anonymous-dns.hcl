# Policy "anonymous-dns" -- OPTIONAL replacement for "anonymous" on the
# anonymous token, for sites that resolve <node>.node.consul or
# <service>.service.consul through Consul DNS without a token.
#
# Attached only by `deploy/bootstrap-acl.sh --anonymous-dns` (instead of
# "anonymous"; a re-run without the flag switches back). bootstrap-acl.sh
# creates the policy either way, unattached.
#
# COST: anyone who can reach an agent's HTTP or DNS port without a token can
# list every node name and address and every service in the datacenter --
# the whole fleet inventory, i.e. the attacker's target list. Keep
# client_addr on 127.0.0.1 if you use this, and prefer giving DNS clients a
# token (the agent's `default` token) over opening the anonymous one.
#
# KV, ACL, agent, session, event and operator access stay denied (default
# deny). Prepared-query DNS lookups would also need `query_prefix` read;
# deliberately left out.
#
# Managed by deploy/bootstrap-acl.sh. Loads on Consul 1.8.7 and current Consul.

# <node>.node.consul lookups.
node_prefix "" {
  policy = "read"
}

# <service>.service.consul lookups.
service_prefix "" {
  policy = "read"
}
