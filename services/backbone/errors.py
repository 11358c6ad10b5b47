"""Errors of the shared runtime: the event log, the bus and projections."""


class BackboneError(Exception):
    """Root of every error raised by the shared runtime."""


class ConcurrencyError(BackboneError):
    """An append found the aggregate moved past the version it was decided on."""


class EventLogUnavailableError(BackboneError):
    """The event log could not be reached or refused the write."""


class ServiceUnavailableError(BackboneError):
    """No service answered a request within its time limit."""
