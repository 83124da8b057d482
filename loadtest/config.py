"""The workload of one run, as plain values (the CLI builds it; everything else reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loadtest.distributions import Distribution
from loadtest.tenants import TenantSpec

# Hard caps: a run can never be asked for more than this, whatever the flags say.
MAX_DURATION_S = 3600.0
MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 4096
MAX_TASKS = 10_000
DEFAULT_NOISY_FACTOR = 10.0
MAX_NOISY_FACTOR = 1000.0


def noisy_concurrency(concurrency: int, factor: float) -> int:
    """The noisy tenant's workers: `factor` times a steady tenant's, rounded, at least one."""
    return max(1, round(concurrency * factor))


class ConfigError(ValueError):
    """A workload that cannot (or may not) be run."""


@dataclass(frozen=True)
class TaskSetup:
    """Tasks the harness creates through the admin API before the run and deletes after it."""

    num_tasks: int = 0
    init: str = "random"  # "random" | "text" | "sample_vocab"
    num_virtual_tokens: int = 8
    text: str = "Answer the question in one short sentence."


@dataclass(frozen=True)
class LoadConfig:
    """Everything that defines one load run; it goes into the report verbatim."""

    url: str
    mode: str = "closed"  # "closed": fixed concurrency; "open": Poisson arrivals at `rate`
    concurrency: int = 8
    rate: float = 0.0  # requests/s, open loop only
    duration_s: float | None = None  # issue requests for this long ...
    num_requests: int | None = None  # ... or this many (the first bound reached ends the run)
    task_ids: tuple[str, ...] = ()  # tasks by name; none at all: the bare model (no task id sent)
    num_existing_tasks: int = 0  # or: the first N tasks the server lists
    popularity: str = "uniform"  # "uniform" | "zipf"
    zipf_s: float = 1.1
    prompt_tokens: Distribution = field(default_factory=lambda: Distribution.fixed(32))
    max_new_tokens: Distribution = field(default_factory=lambda: Distribution.fixed(16))
    is_stream: bool = True
    api_key: str | None = None
    request_timeout_s: float = 120.0
    max_inflight: int = 1024  # open loop: arrivals beyond this are counted as dropped, not queued
    seed: int = 0
    setup: TaskSetup = field(default_factory=TaskSetup)
    ignore_eos: bool = False  # sent as parameters.ignore_eos_token (LoRAX) only when set
    metrics_interval_s: float = 1.0  # how often the server's /metrics is sampled during the run
    server_pid: int | None = None  # a local server process whose CPU time is measured over the run
    tenants: tuple[TenantSpec, ...] = ()  # none: every request carries `api_key` (one tenant)
    noisy_tenant: str | None = None  # one tenant floods; then `rate`/`concurrency` are per steady tenant
    noisy_factor: float = DEFAULT_NOISY_FACTOR  # the noisy tenant's rate (or concurrency) / a steady one's

    def validate(self) -> "LoadConfig":
        """Raise ConfigError unless the run is bounded and its numbers make sense."""
        if self.mode not in ("closed", "open"):
            raise ConfigError(f"mode must be 'closed' or 'open', not {self.mode!r}")
        if self.duration_s is None and self.num_requests is None:
            raise ConfigError("a run needs --duration or --requests (or both)")
        if self.duration_s is not None and not 0 < self.duration_s <= MAX_DURATION_S:
            raise ConfigError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if self.num_requests is not None and not 0 < self.num_requests <= MAX_REQUESTS:
            raise ConfigError(f"--requests must be in [1, {MAX_REQUESTS}]")
        if self.mode == "closed" and not 0 < self.concurrency <= MAX_CONCURRENCY:
            raise ConfigError(f"--concurrency must be in [1, {MAX_CONCURRENCY}]")
        if self.mode == "open" and not self.rate > 0:
            raise ConfigError("an open-loop run needs --rate > 0")
        if self.popularity not in ("uniform", "zipf"):
            raise ConfigError(f"popularity must be 'uniform' or 'zipf', not {self.popularity!r}")
        if self.popularity == "zipf" and not self.zipf_s > 0:
            raise ConfigError("the Zipf exponent must be > 0")
        if not 0 < self.request_timeout_s <= MAX_DURATION_S:
            raise ConfigError("--request-timeout must be positive and bounded")
        if sum(bool(x) for x in (self.task_ids, self.num_existing_tasks, self.setup.num_tasks)) > 1:
            raise ConfigError("choose one of: task ids, existing tasks, or --setup-tasks")
        if max(len(self.task_ids), self.num_existing_tasks, self.setup.num_tasks) > MAX_TASKS:
            raise ConfigError(f"at most {MAX_TASKS} tasks")
        self.validate_noisy()
        return self

    def validate_noisy(self) -> None:
        """Raise ConfigError unless the noisy-neighbour settings name one of several tenants."""
        if self.noisy_tenant is None:
            return
        if len(self.tenants) < 2:
            raise ConfigError("--noisy-tenant needs --tenants with at least two tenants")
        if self.noisy_tenant not in {t.name for t in self.tenants}:
            names = ", ".join(t.name for t in self.tenants[:10])
            raise ConfigError(f"--noisy-tenant {self.noisy_tenant!r} is not in the tenants file ({names})")
        if not 1 <= self.noisy_factor <= MAX_NOISY_FACTOR:
            raise ConfigError(f"--noisy-factor must be in [1, {MAX_NOISY_FACTOR:g}]")
        num_workers = self.concurrency * (len(self.tenants) - 1) + noisy_concurrency(self.concurrency,
                                                                                     self.noisy_factor)
        if self.mode == "closed" and num_workers > MAX_CONCURRENCY:
            raise ConfigError(f"{num_workers} workers in all (--concurrency per steady tenant, the noisy "
                              f"one x{self.noisy_factor:g}): at most {MAX_CONCURRENCY}")

    @property
    def deadline_s(self) -> float:
        """When the run stops issuing requests, in seconds from its start."""
        return self.duration_s if self.duration_s is not None else MAX_DURATION_S
