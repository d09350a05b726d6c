"""What a run measures and how much: sizes, counts, path names, and the
record of single runs that failed (a section goes on without their sample)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.stack import BenchStack

GiB = 1 << 30
MiB = 1 << 20
DIRECTIONS = ("download", "upload", "both")
# throughput paths, in the order of the tables and charts
PATHS = ("openssh_direct", "openssh_jump", "openssh_nested", "bastion", "bastion_jump")
BASTION_PATHS = ("bastion", "bastion_jump")
# OpenSSH paths whose server-side CPU is measured: the jump host's sshd
# processes (-J), and for the nested hop its sshd plus alice's inner ssh
OPENSSH_CPU_PATHS = ("openssh_jump", "openssh_nested")
CPU_PATHS = (*BASTION_PATHS, *OPENSSH_CPU_PATHS)
# logins also through a bastion with upstream reuse off
LOGIN_PATHS = (*PATHS, "bastion_fresh")
LOGIN_BASTION_PATHS = (*BASTION_PATHS, "bastion_fresh")
PATH_NAMES = {
    "openssh_direct": "OpenSSH direct",
    "openssh_jump": "OpenSSH jump host (`-J`)",
    "openssh_nested": "OpenSSH nested hop (`ssh -A jump ssh host`)",
    "bastion": "bastion, routed session",
    "bastion_jump": "bastion as `-J`",
    "bastion_fresh": "bastion, routed, upstream reuse off",
    "bastion_fresh_w1": "bastion, reuse off, workers = 1",
    "bastion_fresh_w2": "bastion, reuse off, workers = 2",
}
# for chart labels
SHORT_NAMES = {
    "openssh_direct": "OpenSSH\ndirect",
    "openssh_jump": "OpenSSH\n-J",
    "openssh_nested": "OpenSSH\nnested",
    "bastion": "bastion\nrouted",
    "bastion_jump": "bastion\nas -J",
    "bastion_fresh": "bastion\nreuse off",
    "bastion_fresh_w1": "bastion reuse\noff, w=1",
    "bastion_fresh_w2": "bastion reuse\noff, w=2",
}


@dataclass(frozen=True)
class Plan:
    """Sizes and counts; ``quick`` shrinks everything to a smoke test."""

    quick: bool
    download: int
    upload: int
    both: int
    reps: int
    logins: int
    load_seconds: float
    load_clients: int
    idle_sessions: int
    idle_jump_sessions: int
    changes: int
    login_changes: int
    signs: int
    signing_logins: int
    # scale: bytes of one parallel-download run, split over its streams
    parallel_total: int = 768 * MiB
    parallel_counts: tuple[int, ...] = (4, 8)
    scale_clients: int = 32
    scale_seconds: float = 8.0
    # idle sessions through one bastion, RSS read at each total
    idle_steps: tuple[int, ...] = (1000, 2500, 5000, 10000)
    idle_helpers: int = 2
    # repeated logins of one person from one machine, through workers = 2
    reuse_logins: int = 20

    @classmethod
    def full(cls, reps: int = 3) -> Plan:
        return cls(False, GiB, GiB, 256 * MiB, reps, 40, 10.0, 16, 1000, 100, 100, 20, 100, 20)

    @classmethod
    def small(cls) -> Plan:
        return cls(
            True,
            8 * MiB,
            8 * MiB,
            4 * MiB,
            1,
            3,
            2.0,
            16,
            20,
            5,
            5,
            2,
            5,
            3,
            parallel_total=16 * MiB,
            scale_seconds=2.0,
            idle_steps=(20, 60),
            reuse_logins=4,
        )


@dataclass
class Failures:
    """Single runs that failed; their section goes on without the sample."""

    runs: list[dict[str, str]] = field(default_factory=list)

    def add(self, section: str, what: str, exc: Exception) -> None:
        self.runs.append({"section": section, "run": what, "error": str(exc)[:300]})
        print(f"[bench]   FAILED {section} {what}: {exc}", flush=True)


FAILURES = Failures()


def rotate(items: tuple[str, ...], n: int) -> list[str]:
    """``items`` started at position ``n``: runs alternate between paths."""
    k = n % len(items)
    return [*items[k:], *items[:k]]


def bastion_pid(stack: BenchStack, path: str = "bastion") -> int:
    bastion = stack.fresh_bastion if path == "bastion_fresh" else stack.bastion
    assert bastion is not None and bastion.process is not None
    return bastion.process.pid
