"""Errors raised by the job store. The HTTP layer maps `JobNotFound` to 404, `IdempotencyConflict`
and `InvalidTransition` to 409, `InvalidPage` to 400 (every `TileFMError` is a 4xx)."""

from __future__ import annotations

from tilefm.errors import TileFMError


class JobStoreError(TileFMError):
    """Base of the job store's errors."""


class JobNotFound(JobStoreError):
    """No job with that id (never created, or expired from the store)."""

    field = "id"

    def __init__(self, job_id: str):
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class IdempotencyConflict(JobStoreError):
    """The Idempotency-Key was already used, within its 24 h window, for a different request body."""

    field = "Idempotency-Key"

    def __init__(self, key: str, job_id: str):
        super().__init__(
            f"the key {key!r} was already used for another request (job {job_id}); "
            "send a new key for a different job"
        )
        self.key = key
        self.job_id = job_id


class InvalidTransition(JobStoreError):
    """The job's current state does not allow the requested move (see `TRANSITIONS`)."""

    field = "state"

    def __init__(self, job_id: str, current: str, to: str, reason: str | None = None):
        msg = reason or f"job {job_id} is {current}; it cannot become {to}"
        super().__init__(msg)
        self.job_id = job_id
        self.current = current
        self.to = to


class InvalidPage(JobStoreError):
    """A bad `limit` or `cursor` for listing jobs."""

    def __init__(self, message: str, *, field: str):
        super().__init__(message, field=field)
