"""tilefm: run Earth-observation foundation models over whole scenes, publish the outputs as COGs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tilefm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
