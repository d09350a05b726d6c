"""The ``bastion`` command line.

bastion serve --config FILE      run the bastion
bastion route USER --config FILE where USER would go right now, and why
bastion check ADDRESS            Consul script check: is an SSH banner served?
bastion demo                     a local stack to try (see README)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from bastion.config import load_settings
from bastion.errors import BastionError


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # asyncssh logs per packet at INFO/DEBUG: keep it off the data path
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    from bastion.app import serve

    settings = load_settings(args.config)
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        uvloop = None
    # outside the except block: an error while serving must not be chained
    # to the ImportError ("During handling of the above exception ...")
    if uvloop is None:
        asyncio.run(serve(settings, args.drain_timeout))
    else:  # pragma: no cover - optional speed-up
        uvloop.run(serve(settings, args.drain_timeout))
    return 0


def _route(args: argparse.Namespace) -> int:
    from bastion.app import consul_token
    from bastion.credentials import VaultClient
    from bastion.directory import ConsulDirectory
    from bastion.directory.explain import describe

    settings = load_settings(args.config)

    async def explain() -> str:
        vault = VaultClient(settings.vault) if settings.vault.enabled else None
        if vault is not None:
            await vault.start()
        try:
            token = await consul_token(settings, vault)
            directory = ConsulDirectory(settings.consul, token, settings.upstream.default_port)
            await directory.start()
            try:
                await directory.wait_loaded(settings.consul.request_timeout)
                return describe(directory, args.user)
            finally:
                await directory.aclose()
        finally:
            if vault is not None:
                await vault.aclose()

    print(asyncio.run(explain()))
    return 0


def _check(args: argparse.Namespace) -> int:
    from bastion.check import check_ssh_banner

    code, line = check_ssh_banner(args.address, args.timeout)
    print(line)
    return code


def _demo(args: argparse.Namespace) -> int:
    from devstack.demo import run_demo

    return run_demo(args.workdir, args.port)


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
        default=10.0,
        help="seconds live sessions get to finish on shutdown",
    )
    p.set_defaults(func=_serve)

    p = sub.add_parser("route", help="where USER would go right now, and why")
    p.add_argument("user")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=_route)

    p = sub.add_parser("check", help="exit 0 if ADDRESS answers with an SSH banner, else 2")
    p.add_argument("address", help="host:port")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(func=_check)

    p = sub.add_parser("demo", help="run a local stack to try the bastion (needs root)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--port", type=int, default=2222)
    p.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "check":
        _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except BastionError as exc:
        print(f"bastion: {exc.detail}", file=sys.stderr)
        return 2 if args.command == "check" else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
