# Policy "anonymous" -- attached to the built-in anonymous token (accessor
# 00000000-0000-0000-0000-000000000002), i.e. to every request that carries
# no token at all.
#
# default_policy = "deny" already denies everything; the explicit denies
# below make the intent visible, survive a mistaken `default_policy =
# "allow"` on some agent, and take precedence over any "read" a future
# policy might add to the anonymous token (in Consul, deny wins over read
# and write for the same rule).
#
# The price: Consul DNS answers nothing for clients without a token. If you
# need DNS, see anonymous-dns.hcl and `bootstrap-acl.sh --anonymous-dns`.
#
# Managed by deploy/bootstrap-acl.sh. Loads on Consul 1.8.7 and current Consul.

key_prefix "" {
  policy = "deny"
}

node_prefix "" {
  policy = "deny"
}

service_prefix "" {
  policy = "deny"
}

agent_prefix "" {
  policy = "deny"
}

session_prefix "" {
  policy = "deny"
}

event_prefix "" {
  policy = "deny"
}

query_prefix "" {
  policy = "deny"
}

acl      = "deny"
operator = "deny"
keyring  = "deny"
