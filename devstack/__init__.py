"""A local stack of the real components: Consul (ACLs, deny by default),
OpenBao, OpenSSH target hosts and the bastion itself.

Used by the test suite, the benchmarks and ``bastion demo``. Every process is
started on a free 127.0.0.x port, polled for readiness against a deadline (no
fixed sleeps) and stopped by PID (its whole process group).

Nothing here is used by ``bastion serve``; this package sits beside the server
package (``bastion/``), not inside it.
"""

from devstack.bao import BaoServer, bootstrap_vault, setup_vault
from devstack.bastion import BastionProcess, bastion_bin, render_settings, toml_value
from devstack.consul import (
    CONSUL_AGENT_HCL,
    ConsulAgent,
    bootstrap_acl,
    enable_service_dns,
    secure_consul,
)
from devstack.process import (
    ROOT,
    SETUP_HINT,
    Process,
    StackError,
    bao_bin,
    consul_bin,
    free_port,
    http_json,
    ssh_bin,
    ssh_keygen_bin,
    sshd_bin,
    stopping,
    wait_until,
)
from devstack.sshd import (
    SSHD_CONFIG,
    SshdHost,
    keygen,
    sign_user_key,
    ssh_banner,
    ssh_command,
    stop_ssh_client,
)

__all__ = [
    "CONSUL_AGENT_HCL",
    "ROOT",
    "SETUP_HINT",
    "SSHD_CONFIG",
    "BaoServer",
    "BastionProcess",
    "ConsulAgent",
    "Process",
    "SshdHost",
    "StackError",
    "bao_bin",
    "bastion_bin",
    "bootstrap_acl",
    "bootstrap_vault",
    "consul_bin",
    "enable_service_dns",
    "free_port",
    "http_json",
    "keygen",
    "render_settings",
    "secure_consul",
    "setup_vault",
    "sign_user_key",
    "ssh_banner",
    "ssh_bin",
    "ssh_command",
    "ssh_keygen_bin",
    "sshd_bin",
    "stop_ssh_client",
    "stopping",
    "toml_value",
    "wait_until",
]
