"""Integer length distributions (prompt tokens, max_new_tokens), parsed from short specs like `uniform:16,64`."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

KINDS = ("fixed", "uniform", "normal", "lognormal")
MAX_LENGTH = 100_000  # any sample is clipped to [1, MAX_LENGTH]


@dataclass(frozen=True)
class Distribution:
    """A distribution of positive integers.

    fixed:N, uniform:LO,HI (inclusive), normal:MEAN,STD, lognormal:MEDIAN,SIGMA (sigma of the log).
    """

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def fixed(cls, n: int) -> "Distribution":
        """Always `n`."""
        return cls("fixed", float(n))

    @classmethod
    def parse(cls, spec: str) -> "Distribution":
        """`32`, `fixed:32`, `uniform:16,64`, `normal:48,8`, `lognormal:32,0.5` -> Distribution."""
        kind, _, args = spec.strip().partition(":")
        if not args:
            kind, args = "fixed", kind
        try:
            values = [float(x) for x in args.split(",")]
        except ValueError:
            raise ValueError(f"bad distribution {spec!r}: numbers expected") from None
        expected = 1 if kind == "fixed" else 2
        if kind not in KINDS or len(values) != expected:
            raise ValueError(f"bad distribution {spec!r}: use N, uniform:LO,HI, normal:MEAN,STD or lognormal:MEDIAN,SIGMA")
        dist = cls(kind, *values)
        dist.check()
        return dist

    def check(self) -> None:
        """Raise ValueError for parameters that give no positive integers."""
        if self.kind == "fixed" and self.a < 1:
            raise ValueError("fixed length must be >= 1")
        if self.kind == "uniform" and not 1 <= self.a <= self.b:
            raise ValueError("uniform needs 1 <= LO <= HI")
        if self.kind in ("normal", "lognormal") and (self.a < 1 or self.b < 0):
            raise ValueError(f"{self.kind} needs a centre >= 1 and a spread >= 0")

    def sample(self, rng: random.Random) -> int:
        """One value, clipped to [1, MAX_LENGTH]."""
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            value = rng.gauss(self.a, self.b)
        else:
            value = rng.lognormvariate(math.log(self.a), self.b)
        return int(min(max(round(value), 1), MAX_LENGTH))

    @property
    def mean(self) -> float:
        """The mean before clipping (for the report)."""
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        if self.kind == "lognormal":
            return self.a * math.exp(self.b ** 2 / 2)
        return self.a

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"
        return f"{self.kind}:{self.a:g},{self.b:g}"
