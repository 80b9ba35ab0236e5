"""The job API service: `uvicorn app:app --app-dir services/jobs` (or `tilefm up`)."""

from tilefm.api.jobs import create_app

app = create_app()
