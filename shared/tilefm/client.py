"""A small HTTP client for the job API (what `tilefm jobs ...` uses)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from tilefm.errors import TileFMError
from tilefm.jobs.models import Job, JobEvent, JobSpec


class ApiError(TileFMError):
    def __init__(self, status: int, body: Any):
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {err.get('message') or body}", field=err.get("field"))
        self.status = status


class JobsClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _check(self, r: httpx.Response) -> Any:
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise ApiError(r.status_code, body)
        return body

    def submit(self, spec: JobSpec, idempotency_key: str | None = None) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return Job.model_validate(
            self._check(
                self.http.post(
                    "/v1/jobs", json=spec.model_dump(mode="json", exclude_none=True), headers=headers
                )
            )
        )

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._check(self.http.get(f"/v1/jobs/{job_id}")))

    def list(
        self, state: str | None = None, limit: int = 20, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        params = {
            k: v for k, v in {"state": state, "limit": limit, "cursor": cursor}.items() if v is not None
        }
        body = self._check(self.http.get("/v1/jobs", params=params))
        return [Job.model_validate(j) for j in body["jobs"]], body.get("next_cursor")

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._check(self.http.post(f"/v1/jobs/{job_id}:cancel")))

    def events(self, job_id: str) -> Iterator[JobEvent]:
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    yield JobEvent.model_validate(json.loads(line[6:]))
