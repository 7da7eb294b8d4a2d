"""Routing by expected gain: escalate a question when the bigger model is expected to do better on it.

The small model's own doubt is a poor escalation signal (the questions it fails are mostly the ones the bigger
model fails too). What decides whether escalating pays is the **expected gain**
``P(big right) - P(small right)`` (:func:`valueprobe.calibration.routing.expected_gain`): the bigger model's
calibrated probability comes from its own valueprobe sidecar's ``/v1/confidence`` (one prefill there, nothing
generated), asked at the same time as the local prefill. Two moments:

* ``before`` (a router): the gain from both prompt-only probabilities, decided before any decoding; an escalated
  question is not answered locally at all.
* ``after`` (a cascade): the gain from the local answer's answer-level probability (needs an answer-level
  artifact), decided once the local answer exists; an escalated answer replaces it (whole responses only).

The threshold is a value (``escalate_gain_above``) or a traffic share (``escalate_gain_rate``): the gain above which
that share of this replica's recent questions lies (a rolling quantile, seeded from a table that ``valueprobe bench
cascade`` writes until enough questions were seen). The target's probability is cached per request for a retry;
a target that is down or slow leaves the question with the local model, flagged and counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from valueprobe.calibration.routing import expected_gain

__all__ = ["GainRouter", "RouteInfo", "confidence_url", "load_gain_table"]

#: gains a rate-based threshold is computed over (the latest), and how many it needs before it trusts them
RATE_WINDOW = 1000
RATE_MIN_SEEN = 50


@dataclass(frozen=True)
class RouteInfo:
    """What gain routing decided for one request (``confidence.route`` in every response)."""

    moment: str  # "before" (router: decided at the prefill) | "after" (cascade: decided on the local answer)
    answered_by: str  # "local" | "escalation"
    reason: str  # "gain_above" | "gain_below" | "target_unavailable" | "abstained" | "not_replaced_in_stream"
    p_local: float | None
    p_target: float | None
    gain: float | None
    threshold: float | None
    target_artifact_id: str | None = None
    target_error: str | None = None
    seconds: float = 0.0  # spent waiting for the target's probability beyond the local prefill

    def to_dict(self) -> dict:
        return asdict(self)


def confidence_url(escalate_url: str) -> str:
    """The target sidecar's ``/v1/confidence`` from its escalation URL (an OpenAI base ``.../v1`` or a root)."""
    base = escalate_url.rstrip("/")
    return f"{base}/confidence" if base.endswith("/v1") else f"{base}/v1/confidence"


def load_gain_table(path: str | None) -> dict[float, float]:
    """``{rate: gain threshold}`` from a ``<out>.gain-rates.json`` of ``valueprobe bench cascade`` (``{}`` if none)."""
    if not path:
        return {}
    try:
        table = json.loads(Path(path).read_text())
        table = table.get("gain_rates", table)
        return {float(rate): float(value) for rate, value in table.items()}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"escalate_gain_table {path}: not a JSON object of rate -> gain threshold ({exc})") from None


class GainRouter:
    """Asks the escalation target for its probability and decides on the gain (see the module docstring).

    Parameters
    ----------
    url : the target sidecar's ``/v1/confidence``.
    above : escalate when the gain is above this (``escalate_gain_above``); or
    rate : escalate this share of the traffic, the highest gains (``escalate_gain_rate``), with
    table : ``{rate: threshold}`` used until :data:`RATE_MIN_SEEN` gains were seen here.
    timeout : seconds to wait for the target's probability; past it the question stays local, flagged.
    """

    def __init__(self, url: str, *, moment: str = "before", above: float | None = None, rate: float | None = None,
                 table: dict[float, float] | None = None, timeout: float = 10.0, api_key: str | None = None,
                 metrics=None, cache_size: int = 4096):
        if (above is None) == (rate is None):
            raise ValueError("gain routing needs exactly one of escalate_gain_above or escalate_gain_rate")
        self.url, self.moment, self.above, self.rate, self.metrics = url, moment, above, rate, metrics
        self.table = table or {}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=timeout, headers=headers)
        self._gains: deque[float] = deque(maxlen=RATE_WINDOW)
        self._cache: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[str, asyncio.Future] = {}

    @classmethod
    def from_settings(cls, settings, answer_probe, metrics) -> GainRouter | None:
        """The router ``escalate_gain_above`` / ``escalate_gain_rate`` ask for, or ``None`` when neither is set."""
        if settings.escalate_gain_above is None and settings.escalate_gain_rate is None:
            return None
        if settings.escalate_gain_moment == "after" and answer_probe is None:
            raise ValueError("escalate_gain_moment 'after' decides on the local answer's answer-level probability: "
                             "it needs an answer-level artifact (--answer-artifact)")
        return cls(settings.escalate_confidence_url or confidence_url(settings.escalate_url),
                   moment=settings.escalate_gain_moment, above=settings.escalate_gain_above,
                   rate=settings.escalate_gain_rate, table=load_gain_table(settings.escalate_gain_table),
                   timeout=settings.escalate_confidence_timeout_s, api_key=settings.upstream_api_key, metrics=metrics)

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- the target's probability -------------------------------------------------------------------------------
    async def target_probability(self, source: dict) -> tuple[float | None, str | None, str | None]:
        """``(P_target, its artifact id, error)`` for a request in ``/v1/confidence`` shape. A repeated request (a
        client's retry, or the same question asked twice at once) is answered from the cache or shares the call in
        flight; failures are not cached."""
        key = json.dumps(source, sort_keys=True)
        if key in self._cache:
            self._cache.move_to_end(key)
            p, artifact = self._cache[key]
            return p, artifact, None
        if key not in self._inflight:
            task = asyncio.ensure_future(self._ask(key, source))
            # gone once answered, whoever still waits: a caller that went away leaves nothing behind
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
            self._inflight[key] = task
        return await asyncio.shield(self._inflight[key])

    async def _ask(self, key: str, source: dict) -> tuple[float | None, str | None, str | None]:
        started = time.perf_counter()
        try:
            response = await self.client.post(self.url, json=source)
            response.raise_for_status()
            body = response.json()
            p, artifact = float(body["probability"]), str(body.get("artifact_id", ""))
            if not 0.0 <= p <= 1.0:  # NaN fails this too
                raise ValueError(f"probability {p!r} is not in [0, 1]")
        except Exception as exc:  # noqa: BLE001 - any failure leaves the question with the local model
            if self.metrics:
                self.metrics.upstream_errors.labels(upstream="route_target").inc()
            return None, None, f"escalation target's confidence ({self.url}) failed: {type(exc).__name__}: {exc}"
        finally:
            if self.metrics:
                self.metrics.route_target_latency.observe(time.perf_counter() - started)
        self._cache[key] = (p, artifact)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return p, artifact, None

    async def timed_probability(self, source: dict) -> tuple[tuple, float]:
        """:meth:`target_probability` and the seconds spent waiting for it."""
        started = time.perf_counter()
        target = await self.target_probability(source)
        return target, time.perf_counter() - started

    # -- the decision -------------------------------------------------------------------------------------------
    def threshold(self) -> float:
        """The gain above which a question is escalated now."""
        if self.above is not None:
            return self.above
        if len(self._gains) >= RATE_MIN_SEEN:
            return float(np.quantile(np.asarray(self._gains), 1.0 - self.rate))
        if self.table:  # the nearest fitted rate until this replica has seen enough of its own traffic
            return self.table[min(self.table, key=lambda r: abs(r - self.rate))]
        return 0.0

    def decide(self, p_local: float, target: tuple[float | None, str | None, str | None], *, moment: str,
               waited: float = 0.0) -> RouteInfo:
        """Escalate when the gain is above :meth:`threshold` (the threshold in force before this question's gain
        joins the window); the target unavailable -> local, flagged."""
        p_target, artifact, error = target
        if p_target is None:
            info = RouteInfo(moment, "local", "target_unavailable", p_local, None, None, None, None, error, waited)
        else:
            gain = float(expected_gain(p_target, p_local))
            threshold = self.threshold()
            self._gains.append(gain)
            escalate = gain > threshold
            info = RouteInfo(moment, "escalation" if escalate else "local", "gain_above" if escalate else "gain_below",
                             p_local, p_target, gain, threshold, artifact, None, waited)
        self.count(info)
        return info

    def abstained(self, p_local: float, moment: str) -> RouteInfo:
        """The route of a question the policy abstains on (the gain is not asked for), counted."""
        info = RouteInfo(moment, "local", "abstained", p_local, None, None, None)
        self.count(info)
        return info

    def count(self, info: RouteInfo) -> None:
        if self.metrics:
            self.metrics.route_decisions.labels(moment=info.moment, reason=info.reason).inc()
            if info.gain is not None:
                self.metrics.route_gain.observe(info.gain)
