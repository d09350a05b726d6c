# Compose only: the HTTP API must be reachable from the other containers on
# the private compose network. Everywhere else keep client_addr = 127.0.0.1
# (deploy/consul.d/server.hcl).
client_addr = "0.0.0.0"
bind_addr = "0.0.0.0"
