"""Clients for the serving stacks the sidecar talks to: TGI (through the ``text_generation`` client) and any
OpenAI-compatible server (vLLM, llama.cpp server, another valueprobe) over httpx.

Every failure — refused connection, timeout, HTTP error, malformed reply — becomes :class:`UpstreamError`, which
the service turns into a flagged, graceful answer; except a refusal (a 4xx other than 408/429), which says the
request or the sidecar's configuration is wrong (a model name the upstream does not serve, an API key, a path) and
becomes :class:`UpstreamRejectedError`: a gateway answers it as an error, never as a refusal text with status 200.

An OpenAI-compatible server needs a model name. Without one configured (``--upstream-model``,
``--escalate-model``) the sidecar asks the server's ``GET /v1/models`` (:func:`resolve_models` at start-up, else at
the first request) and uses the one model it serves; several or none is a configuration error that names them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from .errors import UpstreamError, UpstreamRejectedError

logger = logging.getLogger("valueprobe.server")

#: statuses an upstream answers when it is busy or slow, not when the request or the configuration is wrong
TRANSIENT_4XX = (408, 429)


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
            from text_generation.errors import BadRequestError, NotFoundError, ValidationError

            where = f"{self.name} (TGI at {self.url})"
            if isinstance(exc, (BadRequestError, ValidationError)):
                raise UpstreamRejectedError(f"{where} refused the request: {type(exc).__name__}: {exc}",
                                            upstream_status=400 if isinstance(exc, BadRequestError) else 422) from None
            if isinstance(exc, NotFoundError):
                raise UpstreamRejectedError(f"{where} answered 404 (is {_flag(self.name, 'url')} the TGI server's root?): "
                                            f"{exc}", upstream_status=404) from None
            raise UpstreamError(f"{where} failed: {type(exc).__name__}: {exc}") from None
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
    """An OpenAI-compatible server. Sends the chat messages (the upstream applies its own chat template). Without a
    ``model``, the one model the server lists (:meth:`discover_model`, at the first request unless
    :func:`resolve_models` found it at start-up)."""

    kind = "openai"

    def __init__(self, url: str, *, timeout: float, model: str | None = None, api_key: str | None = None,
                 name: str = "upstream", metrics=None):
        self.url, self.name, self.metrics, self.model = url.rstrip("/"), name, metrics, model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers)
        self._discovering = asyncio.Lock()

    @property
    def _v1(self) -> str:
        return "" if self.url.endswith("/v1") else "/v1"

    async def discover_model(self) -> str:
        """The one model the server serves (``GET /v1/models``), remembered. :class:`UpstreamModelError` when it
        lists several or none, or refuses to list them (a configuration error: name it with ``--<name>-model``);
        :class:`UpstreamError` when it cannot be reached."""
        async with self._discovering:
            if self.model is None:
                self.model = pick_model(await list_models(self.client, self.url, self._v1), self.url, self.name)
                logger.info("%s at %s serves one model, %r: sending it", self.name, self.url, self.model)
            return self.model

    async def answer(self, *, messages, rendered: str, max_new_tokens: int, temperature=None, top_p=None, seed=None,
                     stop=None, source: dict | None = None) -> UpstreamAnswer:
        """The upstream's chat answer to ``messages``; with ``source`` (a request in valueprobe's
        ``/v1/confidence`` shape, for a target that is a valueprobe sidecar) the request as the user sent it: a
        question with ``choices`` goes through the completions ``choices`` extension, so that the target renders
        and answers it as multiple choice."""
        started = time.perf_counter()
        where = f"{self.name} (OpenAI-compatible at {self.url})"
        try:
            model = self.model or await self.discover_model()
        except UpstreamModelError as exc:
            self._failed()
            raise UpstreamRejectedError(f"{where}: {exc}", upstream_status=None) from None
        except UpstreamError as exc:
            self._failed()
            raise UpstreamError(f"{where} failed: {exc}") from None
        body = {"model": model, "max_tokens": max_new_tokens}
        for key, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed), ("stop", stop or None)):
            if value is not None:
                body[key] = value
        if source and "prompt" in source:
            path, body = f"{self._v1}/completions", {**body, **source}
        else:
            path, body = f"{self._v1}/chat/completions", {**body, "messages": (source or {}).get("messages") or messages}
        try:
            response = await self.client.post(path, json=body)
            if 400 <= response.status_code < 500 and response.status_code not in TRANSIENT_4XX:
                raise UpstreamRejectedError(f"{where} refused the request with HTTP {response.status_code}: "
                                            f"{_error_message(response)}", upstream_status=response.status_code)
            response.raise_for_status()
            choice = response.json()["choices"][0]
            usage = response.json().get("usage") or {}
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            return UpstreamAnswer(text or "", usage.get("completion_tokens"), choice.get("finish_reason") or "stop")
        except UpstreamRejectedError:
            self._failed()
            raise
        except Exception as exc:  # noqa: BLE001
            self._failed()
            raise UpstreamError(f"{where} failed: {type(exc).__name__}: {exc}") from None
        finally:
            self._observe(started)

    async def aclose(self):
        await self.client.aclose()


class UpstreamModelError(ValueError):
    """An OpenAI-compatible server whose model cannot be chosen without being named: it lists several, none, or
    refuses to list them. A configuration error: start-up stops with it."""


def _error_message(response: httpx.Response) -> str:
    """The message of an error reply as OpenAI-compatible servers write it (``{"error": {"message"}}``, vLLM's
    ``{"message"}``, TGI's ``{"error"}``), else the start of its text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])[:500]
    for value in (error, body.get("message") if isinstance(body, dict) else None):
        if isinstance(value, str) and value:
            return value[:500]
    return str(body)[:300]


async def list_models(client: httpx.AsyncClient, url: str, v1: str = "/v1") -> list[str]:
    """The model ids an OpenAI-compatible server lists at ``GET /v1/models``. :class:`UpstreamError` when it cannot
    be reached or answers 5xx/408/429 (it may still be starting: worth asking again); :class:`UpstreamModelError`
    when it refuses (another 4xx: a wrong path or API key) or answers something that is not a model list."""
    try:
        response = await client.get(f"{v1}/models")
    except httpx.HTTPError as exc:
        raise UpstreamError(f"GET {url}{v1}/models: {type(exc).__name__}: {exc}") from None
    if response.status_code >= 500 or response.status_code in TRANSIENT_4XX:
        raise UpstreamError(f"GET {url}{v1}/models answered HTTP {response.status_code}: {_error_message(response)}")
    if response.status_code >= 400:
        raise UpstreamModelError(f"GET {url}{v1}/models answered HTTP {response.status_code} "
                                 f"({_error_message(response)})")
    try:
        return [str(m["id"]) for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise UpstreamModelError(f"GET {url}{v1}/models did not answer an OpenAI model list: "
                                 f"{response.text[:200]!r}") from None


def _flag(name: str, what: str) -> str:
    """The ``serve`` option that sets ``what`` (model, url) of the upstream or the escalation target."""
    return f"--{'upstream' if name == 'upstream' else 'escalate'}-{what}"


def pick_model(ids: list[str], url: str, name: str = "upstream") -> str:
    """The one model of ``ids``; several or none is a :class:`UpstreamModelError` naming the flag that chooses."""
    what = "upstream" if name == "upstream" else "escalation target"
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise UpstreamModelError(f"the {what} at {url} lists no model at /v1/models; name one with "
                                 f"{_flag(name, 'model')}")
    raise UpstreamModelError(f"the {what} at {url} serves {len(ids)} models ({', '.join(map(repr, ids))}); "
                             f"choose one with {_flag(name, 'model')}")


async def resolve_models(settings) -> dict[str, str]:
    """At start-up, before the model loads: the model of each OpenAI-compatible upstream that none was named for.

    The gateway's upstream is required: it is asked every second until it lists its models (it may be starting as
    well) for up to ``upstream_start_timeout_s``; then, or at once when it lists several or none or refuses,
    :class:`UpstreamModelError` stops the start with the reason. The escalation target is asked once: several or
    none stops the start too; a target that is down is asked again at its first escalation (meanwhile escalations
    are answered as a target that is down is). Returns what it found as settings (``upstream_model``,
    ``escalate_model``)."""
    found = {}
    wanted = []
    if settings.mode == "gateway" and settings.upstream_kind == "openai" and not settings.upstream_model:
        wanted.append(("upstream", settings.upstream_url, settings.upstream_start_timeout_s))
    if settings.escalate_url and settings.escalate_kind == "openai" and not settings.escalate_model:
        wanted.append(("escalation", settings.escalate_url, 0.0))
    for name, url, patience in wanted:
        upstream = OpenAIUpstream(url, timeout=min(settings.upstream_timeout_s, 10.0),
                                  api_key=settings.upstream_api_key, name=name)
        deadline = time.monotonic() + patience
        try:
            while True:
                try:
                    found[f"{'upstream' if name == 'upstream' else 'escalate'}_model"] = await upstream.discover_model()
                    break
                except UpstreamError as exc:
                    if name == "escalation":
                        logger.warning("could not list the escalation target's models (%s); asking again at the "
                                       "first escalation (or name it with --escalate-model)", exc)
                        break
                    if time.monotonic() >= deadline:
                        raise UpstreamModelError(
                            f"gateway mode: could not list the upstream's models within "
                            f"{settings.upstream_start_timeout_s:g} s (VALUEPROBE_UPSTREAM_START_TIMEOUT_S) to choose "
                            f"the model to send ({exc}); start the upstream first, or name its model with "
                            "--upstream-model") from None
                    await asyncio.sleep(1.0)
        finally:
            await upstream.aclose()
    return found


def make_upstream(kind: str, url: str, *, timeout: float, model=None, api_key=None, name="upstream", metrics=None):
    if kind == "tgi":
        return TGIUpstream(url, timeout=timeout, name=name, metrics=metrics)
    return OpenAIUpstream(url, timeout=timeout, model=model, api_key=api_key, name=name, metrics=metrics)
