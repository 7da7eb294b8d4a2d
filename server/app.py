"""``create_app()``: the FastAPI sidecar. The lifespan loads model and artifact in the background, so
``/healthz`` answers at once and ``/readyz`` turns 200 when they are loaded."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .http_errors import register_error_handlers
from .metrics import SidecarMetrics
from .settings import Settings

logger = logging.getLogger("valueprobe.server")


def _load(settings: Settings, model=None, tokenizer=None):
    from valueprobe.plugin import ValueProbe, load_model

    if settings.artifact:
        artifact = settings.artifact
    else:
        from valueprobe.weights import default_artifact

        artifact = str(default_artifact())
    from .service import check_pin

    probe = ValueProbe.load(artifact)
    check_pin(probe, settings.artifact_sha256)
    name = settings.model or probe.model_name
    if model is None:
        model, tokenizer = load_model(name, dtype=settings.dtype)
    probe.check_compatible(model, tokenizer, strict=settings.check_fingerprint)
    return model, tokenizer, probe, name


def create_app(settings: Settings | None = None, *, registry: CollectorRegistry | None = None, model=None,
               tokenizer=None) -> FastAPI:
    """Build the app. ``model``/``tokenizer`` may be passed in (tests, embedding in another app)."""
    settings = settings or Settings()
    metrics = SidecarMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from .engine import Engine
        from .service import Sidecar

        async def load():
            try:
                m, t, probe, name = await asyncio.to_thread(_load, settings, model, tokenizer)
                engine = Engine(m, t, probe, max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                                max_queue=settings.max_queue, metrics=metrics)
                await engine.start()
                app.state.sidecar = Sidecar(settings, engine, metrics, name)
                logger.info("valueprobe ready: model %s, artifact %s", name, probe.artifact_id)
            except Exception as exc:  # noqa: BLE001 - reported by /readyz and every route
                logger.exception("loading failed")
                app.state.load_error = f"{type(exc).__name__}: {exc}"

        task = asyncio.create_task(load())
        try:
            yield
        finally:
            task.cancel()
            sidecar = getattr(app.state, "sidecar", None)
            if sidecar is not None:
                await sidecar.aclose()
                await sidecar.engine.stop()

    app = FastAPI(title="valueprobe sidecar", version="0.1.0", lifespan=lifespan,
                  description="Answers plus calibrated confidence from value neurons; abstain / escalate; metrics.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.sidecar = None
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

    from .routes import router

    app.include_router(router)

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
