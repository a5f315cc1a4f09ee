"""Send one big request from a thread and call GET /health until it is answered: did the server keep answering?"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx


def post_while_polling_health(client: httpx.Client, url: str, body: bytes) -> tuple[httpx.Response, float, float,
                                                                                    list[tuple[float, float]]]:
    """POST ``body`` (JSON) to ``url`` in a thread while ``client`` polls ``/health`` (each must answer 200).
    Returns the answer, when it was sent and answered, and (start, end) of every /health call."""
    answer: dict[str, Any] = {}

    def send() -> None:
        t0 = time.monotonic()
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=300)
        answer.update(response=r, t0=t0, t1=time.monotonic())

    sender = threading.Thread(target=send)
    sender.start()
    health: list[tuple[float, float]] = []
    while sender.is_alive():
        t0 = time.monotonic()
        assert client.get("/health").status_code == 200
        health.append((t0, time.monotonic()))
        time.sleep(0.02)
    sender.join()
    return answer["response"], answer["t0"], answer["t1"], health
