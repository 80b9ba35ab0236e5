"""Typed errors. Everything a user can cause derives from `TileFMError`, which the CLI turns into
one line and exit code 2 and the services into a 4xx; anything else is a bug."""


class TileFMError(Exception):
    """A problem with the user's input or environment, described so that they can fix it."""

    #: the input field the problem is about (e.g. "scene.s2", "zoom", "out"), when there is one
    field: str | None = None

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        if field is not None:
            self.field = field

    def __str__(self) -> str:
        msg = super().__str__()
        return f"{self.field}: {msg}" if self.field else msg


class SceneError(TileFMError):
    """The scene cannot be used: a source is missing, unreadable or not georeferenced."""

    field = "scene"


class MissingBandError(SceneError):
    """A band the model needs is not in the scene."""


class NotGeoreferencedError(SceneError):
    """A raster has no CRS or no geotransform, so it cannot be put on the tile grid."""


class PlanError(TileFMError):
    """The tile plan cannot be made: zoom out of range, bbox outside the scene, too many tiles."""


class ZoomError(PlanError):
    field = "zoom"


class BBoxError(PlanError):
    field = "bbox"


class ModelError(TileFMError):
    """Unknown model, bad card, or weights that are missing or fail their checksum."""

    field = "model"


class WeightsError(ModelError):
    """Weights are missing from the model store or do not match the card's sha256."""


class BackendError(TileFMError):
    """The requested backend is not installed or cannot run this model."""

    field = "backend"


class StorageError(TileFMError):
    """An output or input URI cannot be read or written."""

    field = "out"


class ReferenceMismatch(TileFMError):
    """A model's output differs from a reference file by more than the card's tolerance."""

    field = "reference"
