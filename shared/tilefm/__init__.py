"""tilefm: run Earth-observation foundation models over whole scenes, publish the outputs as COGs."""

import warnings
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tilefm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

# Arrays that come back from Ray's object store (or a reader's shared memory) are read-only;
# tilefm's own code wraps them as torch tensors only to read them. torch warns once per process
# that writing to such a tensor is undefined, which a run never does: silenced where tilefm's
# modules trigger it (code elsewhere that triggers it first still sees it).
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning, module=r"tilefm\."
)

__all__ = ["__version__"]
