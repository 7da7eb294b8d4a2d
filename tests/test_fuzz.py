"""Property-based API fuzz: requests generated from the sidecar's own OpenAPI schema (schemathesis strategies,
valid and invalid), sent to a real uvicorn server on loopback with a tiny model. No 5xx other than a polite 503
with Retry-After, and the server stays alive."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

from valueprobe.plugin import save_artifact  # noqa: E402
from valueprobe.plugin.artifact import ArtifactData  # noqa: E402
from valueprobe.server.app import create_app  # noqa: E402
from valueprobe.server.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, fitted, qwen_model, tokenizer):
    import uvicorn

    data, *_ = fitted
    path = tmp_path_factory.mktemp("fuzz") / "probe.safetensors"
    save_artifact(ArtifactData(dict(data.tensors), dict(data.metadata)), path)
    settings = Settings(artifact=str(path), admin_token="fuzz", default_max_new_tokens=2, max_new_tokens_limit=4,
                        max_prompt_chars=400)
    app = create_app(settings, registry=CollectorRegistry(), model=qwen_model, tokenizer=tokenizer)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    schema = schemathesis.openapi.from_dict(app.openapi())
    yield url, schema
    srv.should_exit = True
    thread.join(timeout=10)


def test_fuzzed_requests_never_get_a_server_error(server):
    url, schema = server
    strategy = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))
    seen = {}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=strategy)
    def check(case):
        r = _send(url, case)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        polite = r.status_code == 503 and "retry-after" in r.headers
        assert r.status_code < 500 or polite, f"{case.method} {case.path} -> {r.status_code}: {r.text[:300]}"

    check()
    assert httpx.get(url + "/healthz").status_code == 200
    assert any(400 <= code < 500 for code in seen) and 200 in seen, seen


def _send(url, case):
    kwargs = case.as_transport_kwargs(base_url=url)
    body = kwargs.pop("data", None)
    kwargs.pop("verify", None)
    kwargs.pop("allow_redirects", None)
    return httpx.request(kwargs.pop("method"), kwargs.pop("url"), content=body, timeout=60, **kwargs)


def test_coverage_phase_boundary_values_never_get_a_server_error(server):
    """schemathesis's coverage phase: boundary values of every field of every operation (smallest and largest
    numbers, subnormal floats, empty and over-long strings, missing and extra fields), valid and invalid."""
    url, schema = server
    cases = []
    for result in schema.get_all_operations():
        operation = result.ok()
        config = schema.config.generation_for(operation=operation, phase="coverage")
        cases += schema.iter_coverage_cases(operation, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                            generation_config=config)
    with ThreadPoolExecutor(8) as pool:  # eight clients at once: the sidecar batches what arrives together
        responses = list(pool.map(lambda case: _send(url, case), cases))
    seen, failures = {}, []
    for case, r in zip(cases, responses):
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        if r.status_code >= 500 and not (r.status_code == 503 and "retry-after" in r.headers):
            failures.append(f"{case.method} {case.path} {case.body!r:.200} -> {r.status_code}: {r.text[:200]}")
    assert not failures, "\n".join(failures[:10])
    assert sum(seen.values()) > 100 and 200 in seen and 422 in seen, seen


@pytest.mark.parametrize("path", ["/", "/generate"])
def test_subnormal_temperature_decodes_greedily(server, path):
    """Found by the coverage phase against the shipped model: a subnormal temperature overflowed the logits (500)."""
    url, _ = server
    params = {"do_sample": True, "temperature": 5e-324, "top_p": 5e-324, "seed": 0, "max_new_tokens": 4}
    sampled = httpx.post(url + path, json={"inputs": "0", "parameters": params}, timeout=60)
    greedy = httpx.post(url + path, json={"inputs": "0", "parameters": {"max_new_tokens": 4}}, timeout=60)
    assert sampled.status_code == 200, sampled.text
    text = [r.json()[0] if isinstance(r.json(), list) else r.json() for r in (sampled, greedy)]
    assert text[0]["generated_text"] == text[1]["generated_text"]
    chat = httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "0"}], "temperature": 5e-324, "max_tokens": 4})
    assert chat.status_code == 200, chat.text
