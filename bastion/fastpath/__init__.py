"""Speed-ups that reach into asyncssh internals, applied once at start.

A relayed byte costs the bastion one decryption and one encryption, and
almost all the rest of its CPU is asyncssh's per-packet Python. Each change
was profiled (py-spy) and measured with ``bench/`` (``python -m bench.run``;
results in ``bench/results/latest.md``), and has its own module here, which
says what it changes and why: :mod:`.skip_ignore`, :mod:`.quiet_packet_log`,
:mod:`.quickack`, :mod:`.coalesce_writes`, :mod:`.exact_receive`,
:mod:`.reuse_aead`, :mod:`.fast_channel_data`, :mod:`.fast_receive`,
:mod:`.static_server_options`.

The environment variable ``BASTION_TUNING`` picks the features at start:
unset or ``all`` for every one, ``none`` for plain asyncssh, or a comma-separated
list. It exists to compare with and without (``bench/``) and to rule the
patches out when chasing a problem; there is no reason to turn them off
otherwise.

Every function a patch replaces or relies on is pinned by a fingerprint of
its source (:mod:`.pins`). On an asyncssh whose code differs from the verified
one, :func:`apply` changes nothing and logs a warning (the relay works, only
slower), and ``tests/test_fastpath.py`` fails so that someone re-verifies.

:mod:`.window_fix` is not a speed-up but a correctness fix for asyncssh's
channel window accounting: :func:`apply` installs it whatever the features
(it has pins of its own).

Importing this package loads nothing of asyncssh; :func:`apply` imports the
patches. :mod:`.sockets` (TCP_QUICKACK, which ``relay.py`` uses too) is plain
socket code.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

# the name the bastion's log lines have always carried for these patches
log = logging.getLogger("bastion.tuning")

FEATURES = (
    "skip_ignore",
    "quiet_packet_log",
    "quickack",
    "coalesce_writes",
    "exact_receive",
    "reuse_aead",
    "fast_channel_data",
    "static_server_options",
    "fast_receive",
)

# asyncssh versions the patches were verified against (the fingerprints of
# the functions they replace or rely on are in pins.py)
VERIFIED_VERSIONS = ("2.24.",)


def apply(features: Collection[str] = FEATURES) -> bool:
    """Install the speed-ups once; False (and a warning) where asyncssh differs."""
    from bastion.fastpath import pins

    wanted = frozenset(features)
    if pins.IMPORT_PROBLEM is None:
        from bastion.fastpath import window_fix

        window_fix.install()
    if not wanted:
        log.info("asyncssh speed-ups off (BASTION_TUNING=none)")
        return True
    unknown = wanted - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown tuning features: {', '.join(sorted(unknown))}")
    if pins.State.features:
        return pins.State.features == wanted
    problems = pins.mismatches()
    if problems:
        log.warning(
            "asyncssh speed-ups not applied (relaying still works, only slower): %s",
            "; ".join(problems),
        )
        return False
    _install(wanted)
    pins.State.features = wanted
    log.info("%s", describe())
    return True


def _install(features: frozenset[str]) -> None:
    """The patches, in the order in which they build on one another."""
    from bastion.fastpath import (
        coalesce_writes,
        exact_receive,
        fast_channel_data,
        fast_receive,
        quickack,
        quiet_packet_log,
        reuse_aead,
        skip_ignore,
        static_server_options,
    )

    if "fast_receive" in features:
        # first: exact_receive recognises the parser step it installs
        fast_receive.install()
    if "skip_ignore" in features:
        skip_ignore.install()
    if "exact_receive" in features:
        exact_receive.install()
    if "quickack" in features:
        # wraps data_received as it is now: exact_receive's, if that is on
        quickack.install()
    if "reuse_aead" in features:
        reuse_aead.install()
    if "fast_channel_data" in features:
        fast_channel_data.install(
            skip_ignore="skip_ignore" in features, coalesced="coalesce_writes" in features
        )
    if "static_server_options" in features:
        static_server_options.install()
    if "quiet_packet_log" in features:
        quiet_packet_log.install()
    if "coalesce_writes" in features:
        coalesce_writes.install()


def features_from_env(value: str | None) -> tuple[str, ...]:
    """The features ``BASTION_TUNING`` asks for (see the module docstring)."""
    text = (value or "all").strip().lower()
    if text == "all":
        return FEATURES
    if text == "none":
        return ()
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(names) - set(FEATURES))
    if unknown:
        raise ValueError(
            f"BASTION_TUNING: unknown feature {', '.join(unknown)} "
            f"(known: all, none, {', '.join(FEATURES)})"
        )
    return names


def applied() -> frozenset[str]:
    """The features installed now (empty when none)."""
    from bastion.fastpath import pins

    return pins.State.features


def mismatches() -> list[str]:
    """Why the patches would not be safe on the running asyncssh (empty: they are)."""
    from bastion.fastpath import pins

    return pins.mismatches()


def describe() -> str:
    """One line for the log: the asyncssh version, the features on, the window fix."""
    import asyncssh

    from bastion.fastpath import pins

    features = pins.State.features
    state = f"applied: {', '.join(sorted(features))}" if features else "off"
    window = "on" if pins.State.window_fix else "off"
    return f"asyncssh {asyncssh.__version__} speed-ups {state} (window fix {window})"


def revert() -> None:
    """Put asyncssh back as it was (for tests); pending writes are flushed first."""
    from bastion.fastpath import pins

    pins.revert()
