"""The tiler's errors; the API maps each to its status (all are `TileFMError`, so never a 500)."""

from __future__ import annotations

from tilefm.errors import TileFMError


class JobNotFinished(TileFMError):
    """Tiles exist only for succeeded jobs (409)."""

    field = "id"

    def __init__(self, job_id: str, state: str):
        super().__init__(f"job {job_id} is {state}; its outputs are served once it has succeeded")
        self.job_id, self.state = job_id, state


class OutputUnreadable(TileFMError):
    """The job succeeded but its COG cannot be opened (deleted from storage, credentials) (404)."""

    field = "id"


class TileNotAvailable(TileFMError):
    """A tile outside the output's zoom range or bounds (404, like any missing tile)."""

    field = "z"


class BadRenderParameter(TileFMError):
    """A query parameter that cannot be applied to this output (422)."""


class LimitExceeded(BadRenderParameter):
    """A request over one of the tiler's caps (sizes, band counts, bytes read) (422)."""


class PathNotAllowed(TileFMError):
    """A `url` outside the configured storage prefixes (403)."""

    field = "url"
