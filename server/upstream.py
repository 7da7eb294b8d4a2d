"""Clients for the serving stacks the sidecar talks to: TGI (through the ``text_generation`` client) and any
OpenAI-compatible server (vLLM, llama.cpp server, another valueprobe) over httpx.

Every failure — refused connection, timeout, HTTP error, malformed reply — becomes :class:`UpstreamError`, which
the service turns into a flagged, graceful answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx

from .errors import UpstreamError


@dataclass
class UpstreamAnswer:
    text: str
    completion_tokens: int | None
    finish_reason: str


class TGIUpstream:
    """A Text Generation Inference server. Sends the rendered prompt text as ``inputs`` (TGI applies no template)."""

    kind = "tgi"

    def __init__(self, url: str, *, timeout: float, name: str = "upstream", metrics=None):
        from text_generation import AsyncClient

        self.url, self.name, self.metrics = url.rstrip("/"), name, metrics
        self.client = AsyncClient(self.url, timeout=int(max(1, timeout)))

    async def answer(self, *, messages, rendered: str, max_new_tokens: int, temperature=None, top_p=None, seed=None,
                     stop=None, source: dict | None = None) -> UpstreamAnswer:
        """The upstream's answer to the rendered text (``source``, the request as the user sent it, is for
        OpenAI-compatible valueprobe targets; TGI takes the model's text)."""
        started = time.perf_counter()
        try:
            kwargs = {"max_new_tokens": max_new_tokens, "stop_sequences": stop or None, "seed": seed}
            if temperature and temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p if top_p and top_p < 1 else None)
            response = await self.client.generate(rendered, **kwargs)
            finish = str(getattr(response.details.finish_reason, "value", response.details.finish_reason))
            return UpstreamAnswer(response.generated_text, response.details.generated_tokens,
                                  "length" if finish == "length" else "stop")
        except Exception as exc:  # noqa: BLE001 - any client failure is an upstream failure
            self._failed()
            raise UpstreamError(f"{self.name} (TGI at {self.url}) failed: {type(exc).__name__}: {exc}") from None
        finally:
            self._observe(started)

    def _observe(self, started):
        if self.metrics:
            self.metrics.upstream_latency.labels(upstream=self.name).observe(time.perf_counter() - started)

    def _failed(self):
        if self.metrics:
            self.metrics.upstream_errors.labels(upstream=self.name).inc()

    async def aclose(self):
        pass


class OpenAIUpstream(TGIUpstream):
    """An OpenAI-compatible server. Sends the chat messages (the upstream applies its own chat template)."""

    kind = "openai"

    def __init__(self, url: str, *, timeout: float, model: str | None = None, api_key: str | None = None,
                 name: str = "upstream", metrics=None):
        self.url, self.name, self.metrics, self.model = url.rstrip("/"), name, metrics, model or "default"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers)

    async def answer(self, *, messages, rendered: str, max_new_tokens: int, temperature=None, top_p=None, seed=None,
                     stop=None, source: dict | None = None) -> UpstreamAnswer:
        """The upstream's chat answer to ``messages``; with ``source`` (a request in valueprobe's
        ``/v1/confidence`` shape, for a target that is a valueprobe sidecar) the request as the user sent it: a
        question with ``choices`` goes through the completions ``choices`` extension, so that the target renders
        and answers it as multiple choice."""
        started = time.perf_counter()
        body = {"model": self.model, "max_tokens": max_new_tokens}
        for key, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed), ("stop", stop or None)):
            if value is not None:
                body[key] = value
        v1 = "" if self.url.endswith("/v1") else "/v1"
        if source and "prompt" in source:
            path, body = f"{v1}/completions", {**body, **source}
        else:
            path, body = f"{v1}/chat/completions", {**body, "messages": (source or {}).get("messages") or messages}
        try:
            response = await self.client.post(path, json=body)
            response.raise_for_status()
            choice = response.json()["choices"][0]
            usage = response.json().get("usage") or {}
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            return UpstreamAnswer(text or "", usage.get("completion_tokens"), choice.get("finish_reason") or "stop")
        except Exception as exc:  # noqa: BLE001
            self._failed()
            raise UpstreamError(f"{self.name} (OpenAI-compatible at {self.url}) failed: {type(exc).__name__}: {exc}") from None
        finally:
            self._observe(started)

    async def aclose(self):
        await self.client.aclose()


def make_upstream(kind: str, url: str, *, timeout: float, model=None, api_key=None, name="upstream", metrics=None):
    if kind == "tgi":
        return TGIUpstream(url, timeout=timeout, name=name, metrics=metrics)
    return OpenAIUpstream(url, timeout=timeout, model=model, api_key=api_key, name=name, metrics=metrics)
