"""This test process's own resources, read from /proc/self, for the
tests that repeat an operation many times and check nothing leaked."""

from __future__ import annotations

import os


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def mapping_count() -> int:
    return sum(1 for _ in open("/proc/self/maps"))
