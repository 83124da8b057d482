"""A tenant's limits, as the API keys file sets them (each optional: None is unlimited)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """Requests and tokens per minute, requests in flight, tokens per UTC day."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1, description="input + virtual + generated tokens")
    max_concurrent: int | None = Field(None, ge=1)
    tokens_per_day: int | None = Field(None, ge=1, description="input + virtual + generated; resets 00:00 UTC")

    @property
    def is_unlimited(self) -> bool:
        """No limit set at all."""
        # Asked for every request: the fields themselves, not a model_dump.
        return (self.requests_per_minute is None and self.tokens_per_minute is None and self.max_concurrent is None
                and self.tokens_per_day is None)


NO_LIMITS = Limits()
