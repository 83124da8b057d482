"""Typed errors raised to one request; the HTTP layer maps each to a status code."""


class EngineError(Exception):
    """Base class for errors that concern one request, never the batch."""


class InvalidRequest(EngineError):
    """A parameter is out of range or inconsistent (HTTP 422)."""


class InputTooLong(EngineError):
    """Input tokens, new tokens or total context exceed a configured limit (HTTP 422)."""


class QueueFull(EngineError):
    """The waiting queue is at its limit; the client should retry later (HTTP 429)."""


class IncompatibleTask(EngineError):
    """The task's adapter does not fit the served model (task type or hidden size; HTTP 422)."""


class EngineStopped(EngineError):
    """The engine is shutting down or not started (HTTP 503)."""


class RequestFailed(EngineError):
    """The request failed inside the engine (a model error); its batch mates were not affected."""
