"""Triage webhooks: an abnormal result is POSTed as JSON to each configured URL.

One POST per delivery attempt; the pipeline retries with the same backoff as DICOM destinations. 2xx → stored;
408, 429 and 5xx or no connection → retry; other 4xx → failed (the receiver refuses this payload for good).
The payload carries UIDs, the accession number, scores and the finding, never patient names or IDs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from dicom_node.config import Webhook
from dicom_node.delivery.transfer import SendOutcome

RETRY_HTTP_STATUSES = {408, 425, 429}


@dataclass(frozen=True)
class TriageEvent:
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str | None
    detector: str
    model_version: str
    score: float
    threshold: float
    abnormal: bool
    finding: str
    job_id: int
    study_completed_at: str | None

    def payload(self) -> dict[str, Any]:
        return {"event": "dicom-node.abnormal-result", **self.__dict__}


def post_event(webhook: Webhook, event: TriageEvent) -> SendOutcome:
    try:
        response = httpx.post(webhook.url, json=event.payload(), timeout=webhook.timeout_seconds)
    except httpx.HTTPError as err:
        return SendOutcome("retry", None, f"POST failed: {type(err).__name__}: {err}")
    code = response.status_code
    if 200 <= code < 300:
        return SendOutcome("stored", code, f"HTTP {code}")
    if code in RETRY_HTTP_STATUSES or code >= 500:
        return SendOutcome("retry", code, f"HTTP {code}")
    return SendOutcome("failed", code, f"HTTP {code}: {response.text[:200]}")
