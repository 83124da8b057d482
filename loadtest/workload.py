"""What to send: task choice (uniform or Zipf), Poisson arrivals, prompts of a given length."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from loadtest.config import LoadConfig
from loadtest.tenant_mix import TenantPicker

# Plain words; most are one token for a byte-level BPE, so N words is roughly N tokens.
WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my over"
).split()


@dataclass(frozen=True)
class RequestSpec:
    """One request to send."""

    index: int
    task_id: str | None
    prompt: str
    prompt_words: int
    max_new_tokens: int
    tenant: str | None = None  # whose API key it carries (None: the run's --api-key)


def zipf_weights(num_items: int, s: float) -> list[float]:
    """Normalised Zipf popularity: item k (1-based rank) has weight k^-s."""
    raw = [k ** -s for k in range(1, num_items + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class TaskPicker:
    """Chooses a task per request: uniformly, or by Zipf popularity over the given order."""

    def __init__(self, task_ids: Sequence[str], popularity: str, zipf_s: float, rng: random.Random):
        self.task_ids = list(task_ids)
        self.rng = rng
        self.weights = zipf_weights(len(self.task_ids), zipf_s) if popularity == "zipf" and self.task_ids else None
        self.cum = list(itertools.accumulate(self.weights)) if self.weights else None

    def pick(self) -> str | None:
        """A task id, or None when there are no tasks (the bare model)."""
        if not self.task_ids:
            return None
        if self.cum is None:
            return self.rng.choice(self.task_ids)
        return self.rng.choices(self.task_ids, cum_weights=self.cum, k=1)[0]


def make_prompt(num_words: int, rng: random.Random) -> str:
    """A prompt of `num_words` random words (roughly that many tokens)."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def poisson_arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    """Arrival times (seconds from 0) of a Poisson process of `rate` per second: exponential gaps."""
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        yield t


class Workload:
    """The request stream of a run: deterministic for a given seed."""

    def __init__(self, config: LoadConfig, task_ids: Sequence[str]):
        self.config = config
        self.rng = random.Random(config.seed)
        self.picker = TaskPicker(task_ids, config.popularity, config.zipf_s, random.Random(config.seed + 1))
        # A stream of its own: adding tenants leaves the prompts and tasks of a seed as they were.
        self.tenant_picker = TenantPicker(config.tenants, random.Random(config.seed + 3))

    def spec(self, index: int, tenant: str | None = None) -> RequestSpec:
        """The `index`-th request, for `tenant` (None: picked by popularity when the run has tenants)."""
        num_words = self.config.prompt_tokens.sample(self.rng)
        return RequestSpec(
            index=index,
            task_id=self.picker.pick(),
            prompt=make_prompt(num_words, self.rng),
            prompt_words=num_words,
            max_new_tokens=self.config.max_new_tokens.sample(self.rng),
            tenant=tenant if tenant is not None else self.tenant_picker.pick(),
        )
