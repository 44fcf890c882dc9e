"""Reading one request's audit entries through the gateway's audit API, as an auditor does."""

from __future__ import annotations

import time
from typing import Any

import httpx


def entries_of(
    url: str, bearer: str, request_id: str, want: int = 2, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """`GET /audit/requests/{id}` until it holds `want` entries (or time runs out; then what it
    holds). An entry is durable in the gateway's log first and reaches the store the API reads
    when the shipper next runs, so until then the request is unknown (404) or partial."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(
            f"{url}/audit/requests/{request_id}", headers={"Authorization": f"Bearer {bearer}"}
        )
        entries = r.json().get("entries", []) if r.status_code == 200 else []
        if len(entries) >= want or time.monotonic() > deadline:
            return list(entries)
        time.sleep(0.1)
