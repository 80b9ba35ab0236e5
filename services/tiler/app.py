"""The tile server: `uvicorn app:app --app-dir services/tiler` (or `tilefm up --tiler`)."""

from pathlib import Path

from tilefm.api.tiler import create_app

app = create_app(viewer_dir=Path(__file__).resolve().parent / "viewer")
