"""Token buckets for a port's ingress, with Firecracker's rate limiter's
parameters: `size` tokens that refill in full every `refill_time` ms, plus
a `one_time_burst` spent first and never refilled. One bucket counts
bytes, another frames; a frame passes when both have room."""

from __future__ import annotations

import time
from typing import Any, Callable


class TokenBucket:
    def __init__(self, size: int, refill_time: int, one_time_burst: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        if size <= 0 or refill_time <= 0 or one_time_burst < 0:
            raise ValueError("a token bucket needs size > 0, refill_time > 0 and one_time_burst >= 0")
        self.size = size
        self.refill_time = refill_time
        self.burst = one_time_burst
        self.clock = clock
        self.tokens = float(size)
        self._last = clock()

    def __repr__(self) -> str:
        return f"TokenBucket({self.tokens:.0f}/{self.size} per {self.refill_time} ms, burst={self.burst})"

    def _refill(self) -> None:
        now = self.clock()
        elapsed_ms = (now - self._last) * 1000.0
        self._last = now
        self.tokens = min(float(self.size), self.tokens + elapsed_ms * self.size / self.refill_time)

    def reduce(self, n: int) -> bool:
        """Takes n tokens; False (and nothing taken) when there are too few."""
        if self.burst:
            take = min(self.burst, n)
            self.burst -= take
            n -= take
            if not n:
                return True
        self._refill()
        if n > self.size:               # larger than the bucket: passes only from a full one
            if self.tokens >= self.size:
                self.tokens = 0.0
                return True
            return False
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False

    def give_back(self, n: int) -> None:
        self.tokens = min(float(self.size), self.tokens + n)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "refill_time": self.refill_time,
                "one_time_burst": self.burst, "tokens": int(self.tokens)}


class RateLimiter:
    def __init__(self, bandwidth: TokenBucket | None = None, ops: TokenBucket | None = None):
        self.bandwidth = bandwidth
        self.ops = ops

    def __repr__(self) -> str:
        return f"RateLimiter(bandwidth={self.bandwidth}, ops={self.ops})"

    def allow(self, nbytes: int) -> bool:
        if self.ops is not None and not self.ops.reduce(1):
            return False
        if self.bandwidth is not None and not self.bandwidth.reduce(nbytes):
            if self.ops is not None:
                self.ops.give_back(1)
            return False
        return True

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None,
                    clock: Callable[[], float] = time.monotonic) -> "RateLimiter | None":
        """{"bandwidth": {size, refill_time, one_time_burst}, "ops": {...}};
        raises ValueError for anything else."""
        if not cfg:
            return None
        if not isinstance(cfg, dict) or set(cfg) - {"bandwidth", "ops"}:
            raise ValueError("rate_limit takes only 'bandwidth' and 'ops'")
        buckets = {}
        for kind in ("bandwidth", "ops"):
            b = cfg.get(kind)
            if b is None:
                continue
            if not isinstance(b, dict) or set(b) - {"size", "refill_time", "one_time_burst"}:
                raise ValueError(f"rate_limit.{kind} takes size, refill_time and one_time_burst")
            try:
                buckets[kind] = TokenBucket(int(b["size"]), int(b["refill_time"]),
                                            int(b.get("one_time_burst", 0)), clock)
            except (KeyError, TypeError) as e:
                raise ValueError(f"rate_limit.{kind} needs integer size and refill_time") from e
        return cls(**buckets) if buckets else None

    def to_dict(self) -> dict[str, Any]:
        return {k: b.to_dict() for k, b in (("bandwidth", self.bandwidth), ("ops", self.ops)) if b}
