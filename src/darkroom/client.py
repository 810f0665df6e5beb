"""A small synchronous client for the native API (the CLI uses it; the full SDK grows from here)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx


class ApiError(RuntimeError):
    def __init__(self, status: int, error: dict[str, Any]) -> None:
        self.status = status
        self.error = error
        field = f" [{error.get('field')}]" if error.get("field") else ""
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}{field}")


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 60.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": "http_error", "message": response.text[:200]}
            raise ApiError(response.status_code, error)
        return response

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Queue a job. Every submit carries an idempotency key, so a retried submit never makes two jobs."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return self._check(self.http.post("/v1/jobs", json=body, headers=headers)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.delete(f"/v1/jobs/{job_id}")).json()

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Server-Sent Events of a job until it ends."""
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(60, read=None)) as resp:
            self._check(resp)
            event: dict[str, Any] = {}
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    event = json.loads(line[5:].strip())
                elif not line and event:
                    yield event
                    event = {}

    def image(self, image_id_or_url: str) -> bytes:
        path = image_id_or_url if "/" in image_id_or_url else f"/v1/images/{image_id_or_url}"
        return self._check(self.http.get(path)).content

    def models(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/models")).json()
