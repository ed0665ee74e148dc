"""argparse value types for numeric options: a value out of range is a one-line usage error naming the option."""

from __future__ import annotations

import argparse
import math
from typing import Callable, NoReturn

from server.engine.types import SEED_MAX

#: Largest value of a protobuf ``int32`` field (``max_new_tokens``, ``top_k``, ``r``, ``max_steps``, …).
INT32_MAX = 2**31 - 1
#: Largest value of a protobuf ``int64`` / ``uint64`` field.
INT64_MAX = 2**63 - 1
UINT64_MAX = SEED_MAX
#: Largest finite protobuf ``float`` (IEEE-754 single precision), e.g. ``lora_alpha``.
FLOAT32_MAX = 3.4028234663852886e38
#: Longest accepted RPC deadline (seconds, ~31 years): gRPC's deadline arithmetic overflows past ~9.2e9 s and
#: then fails every call at once with DEADLINE_EXCEEDED.
MAX_TIMEOUT_S = 1e9


def _bound(value: float | None, infinite: str) -> str:
    if value is None:
        return infinite
    return f"{value:g}" if isinstance(value, float) else str(value)


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    return f"{'(' if lo_open else '['}{_bound(lo, '-inf')}, {_bound(hi, 'inf')}{')' if hi_open else ']'}"


def _finite_range(lo, hi, lo_open: bool, hi_open: bool) -> str:
    """``"a finite number in [0, 1]"``, ``"a finite number > 0"``, ``"a finite number"`` (no infinite bounds shown)."""
    if lo is not None and hi is not None:
        return f"a finite number in {_interval(lo, hi, lo_open, hi_open)}"
    if lo is not None:
        return f"a finite number {'>' if lo_open else '>='} {_bound(lo, '')}"
    if hi is not None:
        return f"a finite number {'<' if hi_open else '<='} {_bound(hi, '')}"
    return "a finite number"


def one_line(text: str) -> str:
    """``text`` with its lines joined by single spaces: every message the command line prints is one line, even
    when a library's error text (a YAML parser's, say) spans several."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def target_address(text: str) -> str:
    """An argparse ``type`` for ``--target``: ``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a port in 1..65535, or a
    gRPC URI (``dns:///…``, ``unix:…``, ``ipv4:…``, ``ipv6:…``) passed through. Refuses an empty host or a port
    out of range, which gRPC would otherwise wrap silently (``:115587`` reached port 50051)."""
    text = text.strip()
    if text.startswith(("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host or host in ("[]",) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port in 1..65535, got {text!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"an IPv6 host goes in brackets ([::1]:50051), got {text!r}")
    return text


def int_in(lo: int | None, hi: int | None) -> Callable[[str], int]:
    """An argparse ``type`` parsing a base-10 integer in ``[lo, hi]`` (None = unbounded on that side).

    The callable raises ``argparse.ArgumentTypeError`` (argparse prints it as ``argument --opt: …``, exit 2) for
    anything else, e.g. ``must be an integer in [1, 2147483647], got '99999999999'``."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer in {_interval(lo, hi, False, False)}, got {text!r}") \
                from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer in {_interval(lo, hi, False, False)}, got {text!r}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` parsing a finite number in the interval from ``lo`` to ``hi`` (open ends as given; None
    = unbounded). NaN, infinities and numbers that overflow a double (``1e999``) are refused like any value out of
    range, with ``argparse.ArgumentTypeError``."""
    where = _finite_range(lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {where}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {where}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr — ``PROG: error: MESSAGE (see PROG
    --help)`` — and exit status 2, instead of the usage block and the message."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
