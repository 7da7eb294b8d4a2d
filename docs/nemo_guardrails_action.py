"""A NeMo Guardrails custom action that asks a valueprobe sidecar whether the bot is likely to answer correctly.

Register it in your rails' ``config.py``::

    from nemo_guardrails_action import check_confidence

    def init(app):
        app.register_action(check_confidence, "check_confidence")

and call it from a Colang flow before the bot answers (Colang 1.0)::

    define flow check answer confidence
      user ...
      $confident = execute check_confidence(threshold=0.5)
      if not $confident
        bot say "I am not sure about this one; let me hand it to a colleague."
        stop

NeMo passes the conversation's ``context`` (``user_message`` is the last user turn). The sidecar scores the question
prompt-only (``POST /v1/confidence``, no generation), so the check costs one prefill of the small model that serves
it. When the sidecar cannot be reached the action says "not confident" (``on_error=False``): an unverified answer is
held back rather than passed; set ``on_error=True`` to let answers through instead.

Tested against a real sidecar in ``tests/test_consumers.py`` (NeMo itself is not installed there: the action is a
plain coroutine, which is all NeMo needs).
"""

from __future__ import annotations

import os
from typing import Optional

import httpx

VALUEPROBE_URL = os.environ.get("VALUEPROBE_URL", "http://127.0.0.1:8000")


async def check_confidence(context: Optional[dict] = None, threshold: float = 0.5, url: Optional[str] = None,
                           on_error: bool = False, timeout: float = 30.0) -> bool:
    """``True`` when the sidecar's calibrated P(correct) for the user's last message is at least ``threshold``."""
    question = (context or {}).get("user_message") or ""
    if not question.strip():
        return on_error
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            response = await client.post(f"{url or VALUEPROBE_URL}/v1/confidence", json={"prompt": question})
            response.raise_for_status()
    except httpx.HTTPError:
        return on_error
    return response.json()["probability"] >= threshold
