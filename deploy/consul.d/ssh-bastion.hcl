# Service definition for the SSH bastion: put it in the Consul config
# directory of the bastion host's agent (/etc/consul.d/, mode 0640,
# owner root, group consul: it holds a token), then `systemctl reload consul`.
#
# TOKEN: the `token` value below is a placeholder: replace it with the
# bastion token (bastion.token written by deploy/bootstrap-acl.sh; its
# policy grants `service "ssh-bastion" write`). Consul 1.8 syncs a service to the catalog
# with the token of its definition; without one, sync is "blocked by ACLs".
# deploy/README-operators.md shows a substitution that keeps the secret off
# command lines. A left-over placeholder fails closed (sync refused).
#
# CHECK: a LOCAL script check (needs enable_local_script_checks = true; it
# can only come from a file like this one, never through the HTTP API).
# `bastion check` connects to the listener, reads the SSH identification
# line and exits 0 (passing) or 2 (critical), printing one line that Consul
# shows as the check output. `bastion` must be on the PATH of the consul
# process, or write its absolute path (e.g. /opt/bastion/venv/bin/bastion).

service {
  id   = "ssh-bastion"
  name = "ssh-bastion"
  port = 2222
  tags = ["ssh"]

  token = "@BASTION_CONSUL_TOKEN@"

  check {
    id       = "ssh-bastion-banner"
    name     = "SSH banner on 127.0.0.1:2222"
    args     = ["bastion", "check", "127.0.0.1:2222", "--timeout", "2"]
    interval = "10s"
    # Consul kills the check after this; bastion check gives up after 2 s.
    timeout  = "5s"
    # A bastion that stays critical this long is removed from the catalog
    # (it comes back on the next agent restart or `consul reload`).
    deregister_critical_service_after = "30m"
  }
}
