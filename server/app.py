"""``create_app()``: the FastAPI sidecar. The lifespan loads model and artifact in the background, so
``/healthz`` answers at once and ``/readyz`` turns 200 when they are loaded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.routing import Route

from valueprobe.plugin.fingerprint import library_versions

from .http_errors import register_error_handlers
from .metrics import SidecarMetrics
from .settings import Settings

logger = logging.getLogger("valueprobe.server")


def _load(settings: Settings, store, model=None, tokenizer=None):
    from valueprobe.plugin import load_model

    probe = _probe_for(settings, store)
    name = settings.model or probe.model_name
    if model is None:
        model, tokenizer = load_model(name, dtype=settings.dtype, device=settings.device)
    probe.check_compatible(model, tokenizer, strict=settings.check_fingerprint)
    return model, tokenizer, probe, name


def _probe_for(settings: Settings, store):
    from valueprobe.plugin import ValueProbe
    from valueprobe.plugin.artifact import TOKEN_POSITION

    from .service import check_pin, resolve_thresholds

    probe = ValueProbe.load(settings.artifact_path())
    probe.require_position(TOKEN_POSITION)
    check_pin(probe, settings.artifact_sha256)
    resolve_thresholds(settings, probe.thresholds or {})  # a rate the artifact was not fitted for: before the model
    newer = _newest_promoted(settings, store, probe)
    if newer is not None:
        newer.require_position(TOKEN_POSITION)
        check_pin(newer, settings.artifact_sha256, pinned=probe)  # a recalibration of the pinned bytes only
        probe = newer
    return probe


def _newest_promoted(settings: Settings, store, probe):
    """The newest calibration of ``probe``'s fitted artifact promoted from feedback (by any replica sharing the
    store) when it is newer than ``probe``, loaded; ``None`` otherwise or with recalibration off (which serves the
    fitted calibration as it is)."""
    if settings.recalibration == "off" or store is None:
        return None
    from .service import materialize_promotion

    row = store.latest_promotion(probe.calibration_origin, probe.calibration_version)
    if row is None:
        return None
    newer = materialize_promotion(row, settings.calibration_dir)
    logger.info("serving calibration %d of %s (promoted from feedback by %s)", newer.calibration_version,
                probe.artifact_id, row["replica"])
    return newer


def _search_probe_for(settings: Settings, engine):
    """The step-value artifact for ``search`` (``--search-artifact``), checked against the served model."""
    from valueprobe.plugin import ValueProbe

    if not settings.search_artifact:
        return None
    if not engine.supports_search:
        raise ValueError(f"search_artifact needs an engine that searches (transformers), not {settings.engine}")
    probe = ValueProbe.load(settings.search_artifact)
    probe.require_position("step_end")
    probe.check_compatible(engine.model, engine.tokenizer, strict=settings.check_fingerprint)
    return probe


def _answer_probe_for(settings: Settings, engine, probe, store=None):
    """The answer-level artifact (``--answer-artifact``; by default the one beside the served artifact), or the
    newest calibration of it promoted from feedback (in ``store``, by any replica), checked against the served model
    by the caller; ``None`` when there is none or the engine cannot read it."""
    from valueprobe.plugin import ValueProbe
    from valueprobe.plugin.artifact import ANSWER_END
    from valueprobe.weights import answer_artifact_beside

    requested = settings.answer_artifact
    if requested and requested.lower() == "none":
        return None
    path = requested or answer_artifact_beside(settings.artifact_path())
    if path is None:
        return None
    if not engine.supports_answer_confidence:
        if requested:
            raise ValueError(f"answer_artifact needs an engine that reads the answer's end, not {settings.engine}")
        logger.warning("the %s engine does not read answer-level confidence: %s is not used", settings.engine, path)
        return None
    answer = ValueProbe.load(path)
    answer.require_position(ANSWER_END)
    newer = _newest_promoted(settings, store, answer)
    if newer is not None:
        newer.require_position(ANSWER_END)
        answer = newer
    return answer


async def _load_vllm(settings: Settings, metrics, store):
    """vLLM engine in this process, loading the model's Hugging Face folder (a known model is converted once)."""
    from valueprobe.plugin.models import resolve_model_dir

    from .engines.vllm_engine import VllmEngine

    probe = await asyncio.to_thread(_probe_for, settings, store)
    name = settings.model or probe.model_name
    folder = await asyncio.to_thread(resolve_model_dir, name)
    engine = await VllmEngine.create(folder, probe, check_fingerprint=settings.check_fingerprint,
                                     max_queue=settings.max_queue, metrics=metrics, dtype=settings.dtype,
                                     kv_cache_gb=settings.vllm_kv_cache_gb,
                                     max_model_len=settings.vllm_max_model_len, max_num_seqs=settings.vllm_max_num_seqs,
                                     max_num_batched_tokens=settings.vllm_max_num_batched_tokens)
    return engine, probe, name


class _AsgiEndpoint:
    """An ASGI app as a route endpoint (a plain function would be taken for a request handler)."""

    def __init__(self, asgi):
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        await self.asgi(scope, receive, send)


def create_app(settings: Settings | None = None, *, registry: CollectorRegistry | None = None, model=None,
               tokenizer=None, on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """Build the app. ``model``/``tokenizer`` may be passed in (tests, embedding in another app).

    When loading fails the app answers 503 ``not_ready`` naming the reason, and calls ``on_load_failure`` with it
    (:func:`serve` uses it to stop the server, so a supervisor sees the exit)."""
    settings = settings or Settings()
    metrics = SidecarMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from .engines.transformers_engine import TransformersEngine
        from .service import Sidecar, open_store
        from .upstream import resolve_models

        store = None

        async def load():
            nonlocal store
            try:
                # an OpenAI upstream's model before anything loads: a gateway that could only answer errors stops
                for setting, served_model in (await resolve_models(settings)).items():
                    setattr(settings, setting, served_model)
                # the store first: the newest promoted calibration is what this replica serves
                store = await asyncio.to_thread(open_store, settings, metrics)
                if settings.engine == "vllm":
                    engine, probe, name = await _load_vllm(settings, metrics, store)
                else:
                    m, t, probe, name = await asyncio.to_thread(_load, settings, store, model, tokenizer)
                    engine = TransformersEngine(m, t, probe, max_batch_size=settings.max_batch_size,
                                    max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, metrics=metrics)
                search_probe = await asyncio.to_thread(_search_probe_for, settings, engine)
                answer_probe = await asyncio.to_thread(_answer_probe_for, settings, engine, probe, store)
                if answer_probe is not None:  # checked against the served model (and hooked, on vLLM)
                    await engine.attach_answer(answer_probe, strict=settings.check_fingerprint)
                await engine.start()
                sidecar = Sidecar(settings, engine, metrics, name, search_probe=search_probe,
                                  answer_probe=answer_probe, store=store)
                await sidecar.restore()
                app.state.follow_store = asyncio.create_task(sidecar.follow_store())
                app.state.sidecar = sidecar
                logger.info("valueprobe ready: model %s, artifact %s%s%s", name, probe.artifact_id,
                            f", search values by {search_probe.artifact_id}" if search_probe else "",
                            f", answers scored by {answer_probe.artifact_id}" if answer_probe else "")
            except Exception as exc:  # noqa: BLE001 - reported by /readyz and every route
                logger.exception("loading failed")
                app.state.load_error = f"{type(exc).__name__}: {exc}"
                if on_load_failure is not None:
                    on_load_failure(app.state.load_error)

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()
            follow = getattr(app.state, "follow_store", None)
            if follow is not None:
                follow.cancel()
            sidecar = getattr(app.state, "sidecar", None)
            if sidecar is not None:
                await sidecar.aclose()  # closes the store: what is queued is written first
                await sidecar.engine.stop()
            elif store is not None:
                await asyncio.to_thread(store.close)

    app = FastAPI(title="valueprobe sidecar", version=library_versions().get("valueprobe", "unknown"), lifespan=lifespan,
                  description="Answers plus calibrated confidence from value neurons; abstain / escalate; metrics.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.sidecar = None
    app.state.follow_store = None
    app.state.load_error = None
    register_error_handlers(app)

    @app.middleware("http")
    async def observe_duration(request, call_next):
        # Label by the matched route template (bounded), not the raw path.
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request_latency.labels(route=getattr(route, "path", "unmatched")).observe(time.perf_counter() - started)
        return response

    from .consumers import router as consumers
    from .routes import router

    app.include_router(router)
    app.include_router(consumers)

    # prometheus_client's own ASGI app (content negotiation, gzip); a Route, not a Mount, so /metrics does not
    # redirect to /metrics/.
    app.router.routes.append(Route("/metrics", _AsgiEndpoint(make_asgi_app(registry=metrics.registry)),
                                   include_in_schema=False))

    return app


def serve(settings: Settings, *, log_level: str = "info") -> str | None:
    """Run the sidecar under uvicorn until it is stopped. Returns ``None`` after a clean stop, or the reason the
    model or artifact could not be loaded: the server then stops at once instead of answering 503 for ever, as
    vLLM and TGI do, so that a supervisor restarts it and a person reads why."""
    import uvicorn

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(reason: str) -> None:
        failure.append(reason)
        server.should_exit = True

    app = create_app(settings, on_load_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level))
    server.run()
    return failure[0] if failure else None
