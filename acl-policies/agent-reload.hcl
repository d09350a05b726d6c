# Policy "agent-reload" -- reloads the Consul agent of ONE node (token:
# agent-reload.token), for `bastion register`, which writes the bastion's
# service definition into that agent's config directory and then runs
# `consul reload` (PUT /v1/agent/reload: needs agent:write on the agent's own
# node name, on Consul 1.8.7 and current Consul).
#
# @AGENT_NODE@ is a template: deploy/bootstrap-acl.sh puts in the node name of
# the agent it manages (--agent-node, or /v1/agent/self), so the token reloads
# that agent and no other (403 on every other node's agent).
#
# What "agent write" on that node also allows, and Consul cannot split off:
# reading the agent's config, metrics and logs (/v1/agent/self, /metrics,
# /monitor), joining it to other agents, making it leave the cluster, and --
# on Consul 1.8 only -- setting the agent's own ACL tokens
# (/v1/agent/token/*; current Consul requires acl:write for that). It cannot
# read or write KV, register services or checks, change nodes, or read or
# write ACLs. Where `bastion register` runs as root anyway, the service
# manager (`systemctl reload consul`: a SIGHUP, no token at all) is the
# smaller privilege; use this token where it cannot.
#
# Managed by deploy/bootstrap-acl.sh. Loads on Consul 1.8.7 and current Consul.

agent "@AGENT_NODE@" {
  policy = "write"
}
