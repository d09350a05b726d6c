"""The ``bastion`` command line.

bastion serve --config FILE      run the bastion
bastion route USER --config FILE where USER would go right now, and why
bastion check ADDRESS            Consul script check: is an SSH banner served?
bastion register --config FILE --consul-config-dir DIR
                                 the bastion's service and local check, into the agent's config
bastion replay SESSION --config FILE  play a session recording ([recording] dir)
bastion sessions [--json]        the live sessions (over the admin socket)
bastion kill CONN | --user NAME  end live sessions, with a notice to the person
bastion drain                    drain this bastion, as SIGTERM does (over the admin socket)
bastion doctor --config FILE     is this deployment safe? a PASS/WARN/FAIL table
bastion grant USER ROUTE --for 2h --config FILE --consul-token-file FILE
                                 temporary access (a Consul key that expires); --list, --revoke
bastion demo                     a local stack to try (see README)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bastion import grants
from bastion.config import DEFAULT_ADMIN_SOCKET, load_settings
from bastion.errors import BastionError


def _setup_logging(level: str, worker: int | None = None) -> None:
    # a worker's lines say which worker wrote them ([server] workers > 1)
    who = "" if worker is None else f"[worker {worker}] "
    logging.basicConfig(
        level=level.upper(), format=f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"
    )
    # asyncssh logs per packet at INFO/DEBUG: keep it off the data path
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    from bastion.serving import serve
    from bastion.workers import Supervisor, WorkerRole

    settings = load_settings(args.config)
    role = None
    if args.worker is not None:  # started by the supervisor (bastion/workers.py)
        role = WorkerRole(args.worker, args.listen_fd, args.metrics_socket)
    elif settings.server.workers > 1:
        supervisor = Supervisor(settings, args.config, args.drain_timeout, args.log_level)
        return asyncio.run(supervisor.run())
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        uvloop = None
    # outside the except block: an error while serving must not be chained
    # to the ImportError ("During handling of the above exception ...")
    if uvloop is None:
        asyncio.run(serve(settings, args.drain_timeout, role))
    else:  # pragma: no cover - optional speed-up
        uvloop.run(serve(settings, args.drain_timeout, role))
    return 0


def _route(args: argparse.Namespace) -> int:
    """Explain where USER would go; exit 0 when the login would be routed, 1 if not."""
    from bastion.app import consul_token
    from bastion.credentials import VaultClient
    from bastion.directory import ConsulDirectory
    from bastion.directory.explain import describe
    from bastion.policy import LoginPolicy
    from bastion.trust import HostKeyPolicy

    settings = load_settings(args.config)

    async def explain() -> tuple[str, bool]:
        # Vault only when the Consul token lives there: explaining needs no certificate
        wanted = settings.vault.enabled and settings.consul.token_vault_path is not None
        vault = VaultClient(settings.vault) if wanted else None
        if vault is not None:
            await vault.start()
        try:
            token = await consul_token(settings, vault)
            directory = ConsulDirectory(
                settings.consul,
                token,
                settings.upstream.default_port,
                grants_prefix=settings.access.grants_prefix,  # grants count (docs/access.md)
                grant_max=settings.access.grant_max,
            )
            await directory.start()
            try:
                await directory.wait_loaded(settings.consul.request_timeout)
                text = describe(directory, args.user)
                host_keys = HostKeyPolicy(
                    settings.upstream.known_hosts,
                    directory.host_keys if settings.upstream.host_keys_from_directory else None,
                )
                try:
                    plan = LoginPolicy(directory, host_keys, directory.grants_for).decide(
                        args.user, "explain"
                    )
                except BastionError as exc:
                    return f"{text}\nverdict: REFUSED: {exc.user_message}", False
                dest = plan.destination
                return f"{text}\nverdict: {dest.login}@{dest.label} (host key known)", True
            finally:
                await directory.aclose()
        finally:
            if vault is not None:
                await vault.aclose()

    text, routed = asyncio.run(explain())
    print(text)
    return 0 if routed else 1


def _check(args: argparse.Namespace) -> int:
    from bastion.check import check_ssh_banner

    code, line = check_ssh_banner(args.address, args.timeout)
    print(line)
    return code


def _admin_socket(args: argparse.Namespace) -> Path:
    """The admin socket: --socket, or the [admin] socket of --config, or the default."""
    from bastion.errors import ConfigError

    if args.socket is not None:
        return Path(args.socket)
    if args.config is not None:
        path = load_settings(args.config).admin.socket_path
        if path is None:
            raise ConfigError(f'{args.config}: [admin] socket is "": the admin socket is off')
        return path
    return Path(DEFAULT_ADMIN_SOCKET)


def _sessions(args: argparse.Namespace) -> int:
    import json

    from bastion.admin import format_sessions, request_all

    answers = request_all(_admin_socket(args), {"op": "sessions"})
    sessions = sorted((s for a in answers for s in a["sessions"]), key=lambda s: s["since"])
    if args.json:
        print(json.dumps(sessions, indent=2))
    elif sessions:
        print(format_sessions(sessions))
    else:
        print("no live sessions")
    return 0


def _kill(args: argparse.Namespace) -> int:
    from bastion.admin import AdminError, describe_ended, request_all

    message: dict[str, str] = {"op": "kill"}
    if args.user is not None:
        message["user"] = args.user
    else:
        message["conn"] = args.conn
    if args.why is not None:
        message["why"] = args.why
    ended = [e for a in request_all(_admin_socket(args), message) for e in a["ended"]]
    if not ended:
        target = f"of user {args.user}" if args.user is not None else args.conn
        raise AdminError(f"no live session {target}")
    for item in ended:
        print(describe_ended(item))
    return 0


def _drain(args: argparse.Namespace) -> int:
    from bastion.admin import request_all

    request_all(_admin_socket(args), {"op": "drain"})
    print("draining: out of Consul, no new logins; live sessions run up to [server] drain_timeout")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from bastion.errors import ConfigError
    from bastion.recording import recording_path, replay

    settings = load_settings(args.config)
    if settings.recording.dir is None:
        raise ConfigError(f"{args.config}: [recording] dir is not set: nothing is recorded")
    if args.speed <= 0:
        raise ConfigError("--speed: must be > 0")
    path = recording_path(settings.recording.dir, args.session)
    if not path.exists():
        raise BastionError(f"no recording {path} (recordings are named by the audit's session_id)")
    try:
        replay(path, sys.stdout.buffer, speed=args.speed, raw=args.raw, idle_limit=args.idle_limit)
    except BrokenPipeError:  # | head
        sys.stderr.close()
    return 0


def _register(args: argparse.Namespace) -> int:
    from bastion.register import run_register

    return run_register(
        load_settings(args.config),
        args.consul_config_dir,
        service_token_file=args.service_token_file,
        reload_token_file=args.reload_token_file,
        consul_bin=args.consul_bin,
        deregister=args.deregister,
    )


def _doctor(args: argparse.Namespace) -> int:
    """Check the deployment with the bastion's own settings; exit 1 on any FAIL."""
    from bastion.doctor import diagnose, exit_status, render_json, render_table
    from bastion.secretfiles import read_secret_file

    settings = load_settings(args.config)
    admin = None
    if args.consul_token_file is not None:
        admin = read_secret_file(args.consul_token_file, "--consul-token-file")
    if args.log_level == "INFO":  # the table is the output: no INFO lines around it
        logging.getLogger("bastion").setLevel(logging.WARNING)
    checks = asyncio.run(diagnose(settings, admin, args.consul_token_file))
    print(render_json(checks) if args.json else render_table(checks))
    return exit_status(checks)


def _demo(args: argparse.Namespace) -> int:
    from devstack.demo import run_demo

    return run_demo(args.workdir, args.port, args.bastions, args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bastion", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the bastion")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds live sessions get to finish on SIGTERM (default: [server] drain_timeout)",
    )
    # a worker's part, given by the supervisor ([server] workers > 1)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--listen-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--metrics-socket", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_serve)

    p = sub.add_parser("route", help="where USER would go right now, and why")
    p.add_argument("user")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=_route)

    p = sub.add_parser("check", help="exit 0 if ADDRESS answers with an SSH banner, else 2")
    p.add_argument("address", help="host:port")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=_check)

    def admin_socket_options(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", type=Path, help="the bastion's settings ([admin] socket)")
        where.add_argument(
            "--socket", type=Path, help=f"the admin socket (default: {DEFAULT_ADMIN_SOCKET})"
        )

    p = sub.add_parser(
        "register",
        help="write the bastion's Consul service (local script check) into the agent's "
        "config directory, validate, reload",
    )
    p.add_argument("--config", type=Path, required=True)
    p.add_argument(
        "--consul-config-dir",
        type=Path,
        required=True,
        help="the local Consul agent's config directory, e.g. /etc/consul.d",
    )
    p.add_argument(
        "--service-token-file",
        type=Path,
        help="token for the definition (service write; default: [consul] token_file)",
    )
    p.add_argument(
        "--reload-token-file",
        type=Path,
        help="token for `consul reload` (agent write on this node); without it, "
        "reload with the service manager",
    )
    p.add_argument("--consul-bin", default="consul", help="the consul CLI (default: on PATH)")
    p.add_argument("--deregister", action="store_true", help="remove the service instead")
    p.set_defaults(func=_register)

    p = sub.add_parser("sessions", help="list the live sessions")
    admin_socket_options(p)
    p.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    p.set_defaults(func=_sessions)

    p = sub.add_parser("kill", help="end live sessions; the person reads why")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("conn", nargs="?", help="a connection id (bastion sessions lists them)")
    who.add_argument("--user", help="every live session of this user")
    p.add_argument(
        "--why", help="one line the person reads (default: their session was ended by an operator)"
    )
    admin_socket_options(p)
    p.set_defaults(func=_kill)

    p = sub.add_parser("drain", help="drain this bastion, as SIGTERM does (admin socket)")
    admin_socket_options(p)
    p.set_defaults(func=_drain)

    p = sub.add_parser("replay", help="play a session recording (asciicast v2) to stdout")
    p.add_argument("session", help="session id (the audit's session_id), e.g. 3f2a9c01b4e7-1")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--speed", type=float, default=1.0, help="play this many times faster")
    p.add_argument(
        "--idle-limit", type=float, default=None, help="shorten pauses to at most this many seconds"
    )
    p.add_argument("--raw", action="store_true", help="all output at once, without the timing")
    p.set_defaults(func=_replay)

    p = sub.add_parser("doctor", help="is this deployment safe? checks with PASS/WARN/FAIL")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument(
        "--consul-token-file",
        type=Path,
        help="an operator/management token, used only to read the Consul agent's "
        "configuration (the bastion's own token may not, by design)",
    )
    p.set_defaults(func=_doctor)

    grants.add_parser(sub)  # bastion grant (bastion/grants.py)

    p = sub.add_parser("demo", help="run a local stack to try the bastion (needs root)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the stack's files here (default: a new temporary directory, "
        "removed on exit; a given directory is kept)",
    )
    p.add_argument(
        "--port", type=int, default=2222, help="the bastion's port on 127.0.0.1 (default 2222)"
    )
    p.add_argument(
        "--bastions",
        type=int,
        default=1,
        choices=range(1, 10),
        metavar="N",
        help="run N bastions on PORT, PORT+1, ..., each registered in Consul (default 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        choices=range(1, 9),
        metavar="N",
        help="[server] workers of each bastion (default 1)",
    )
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "check":
        _setup_logging(args.log_level, getattr(args, "worker", None))
    try:
        return int(args.func(args))
    except BastionError as exc:
        print(f"bastion: {exc.detail}", file=sys.stderr)
        return 2 if args.command == "check" else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
