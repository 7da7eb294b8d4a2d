"""Each consumer's documented request, answered as that consumer's *own* client parses it (issue 29), against a real
sidecar (uvicorn on loopback, tiny model, an answer-level artifact beside the served one), many clients at once.

The peers' parsing is re-implemented here from their code, read at these commits (file and line cited at each use;
nothing is copied):

* FMS guardrails orchestrator (foundation-model-stack/fms-guardrails-orchestrator @ a33322a): its detector client
  ``src/clients/detector.rs``, its threshold cut ``src/orchestrator/common/tasks.rs``, ``src/orchestrator/common/
  client.rs``, ``src/models.rs``, its health client ``src/clients/http.rs`` / ``src/health.rs``; and the detector API
  spec ``docs/api/openapi_detector_api.yaml``, whose schemas are transcribed below as facts and driven by
  schemathesis (valid requests must get 200 and a conforming body; invalid ones 422 and ``Error``).
* Text Embeddings Inference (huggingface/text-embeddings-inference @ 0d124dc): ``router/src/http/types.rs``
  (``PredictInput``'s visitor, ``PredictRequest``, ``PredictResponse``), ``router/src/http/server.rs``,
  ``router/src/lib.rs`` (``ErrorResponse``).
* vLLM Semantic Router (vllm-project/semantic-router @ 3d48f8c9c): ``src/semantic-router/pkg/classification/
  http_classifier.go`` and ``classifier_jailbreak_risk.go``.
* ``huggingface_hub.InferenceClient`` itself (installed; ``inference/_client.py`` ``text_classification`` returns
  ``TextClassificationOutputElement.parse_obj_as_list(response)[0]``, so it needs ``[[labels]]``).
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import Server

QUESTIONS = ["What is the capital of France?", "Which planet is largest?", "How many legs does a spider have?",
             "the lazy fox?", "Answer with the letter only: which planet is largest?"]
ANSWERS = ["Paris", "Jupiter", "eight", "dog", "B"]
MAX_CHARS = 300  # the sidecars' max_prompt_chars: longer questions are cut (FMS) or cut on request (TEI truncate)
LONG = ("The quick brown fox jumps over the lazy dog. " * 30) + "Which planet is largest?"  # > MAX_CHARS


@pytest.fixture(scope="module")
def sidecar(assets, answer_artifact_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("contracts")
    os.symlink(assets / "model", folder / "model")
    shutil.copy(assets / "probe.safetensors", folder / "probe.safetensors")
    shutil.copy(answer_artifact_file, folder / "probe.answer.safetensors")  # found beside the served artifact
    server = Server(folder, max_prompt_chars=MAX_CHARS)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def prompt_p(sidecar, question: str) -> float:
    r = httpx.post(sidecar.url + "/v1/confidence", json={"prompt": question}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["probability"]


def answer_p(sidecar, question: str, answer: str) -> float:
    r = httpx.post(sidecar.url + "/v1/confidence", json={"prompt": question, "answer": answer}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["answer"]["probability"]


# -- FMS guardrails orchestrator ---------------------------------------------------------------------------------
CONTENTS, GENERATION = "/api/v1/text/contents", "/api/v1/text/generation"


class DetectorError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"{code}: {message!r}")
        self.code, self.message = code, message


def parse_detection(obj: dict, *, contents: bool) -> dict:
    """serde's reading of one detection: ``ContentAnalysisResponse`` (detector.rs:365-387) for contents,
    ``DetectionResult`` (models.rs:950-970) for generation. Every field that is not an ``Option`` and has no
    ``#[serde(default)]`` must be there with its type (``usize`` offsets, ``f64`` score); ``metadata`` is a
    ``BTreeMap<String, Value>`` (models.rs:52)."""
    fields = {"detection": str, "detection_type": str, "score": (int, float)}
    if contents:
        fields.update(start=int, end=int, text=str)
    for name, kind in fields.items():
        assert name in obj and isinstance(obj[name], kind) and not isinstance(obj[name], bool), (name, obj)
    if contents:
        assert obj["start"] >= 0 and obj["end"] >= 0, obj  # usize
    assert obj.get("detector_id") is None or isinstance(obj["detector_id"], str)
    assert obj.get("evidence") is None or all(isinstance(e.get("name"), str) for e in obj["evidence"])
    assert isinstance(obj.get("metadata", {}), dict)
    return obj


class Orchestrator:
    """The orchestrator's side of the detector API, re-implemented from its code, for one configured detector
    (``DetectorConfig``, config.rs:213-221: ``default_threshold``) with the ``whole_doc_chunker`` (one chunk per
    content, starting at 0: tasks.rs ``whole_doc_chunk``)."""

    def __init__(self, url: str, detector_id: str = "valueprobe-confidence", default_threshold: float = 0.5):
        self.url, self.detector_id, self.default_threshold = url, detector_id, default_threshold

    async def post(self, client: httpx.AsyncClient, path: str, body: dict):
        # detector.rs:180-182: the headers it always sends
        headers = {"detector-id": self.detector_id, "content-type": "application/json", "x-model-name": self.detector_id}
        r = await client.post(self.url + path, json=body, headers=headers)
        if r.status_code == 200:  # detector.rs:188
            return r.json()
        raise read_error(r)

    def threshold(self, params: dict) -> tuple[float, dict]:
        """tasks.rs:209-210 (and 336-337): ``params.pop_threshold().unwrap_or(default_threshold)``; pop_threshold
        (models.rs:61-63) removes the key whatever it holds and keeps it only if ``as_f64`` reads a number."""
        params = dict(params)
        value = params.pop("threshold", None)
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        return (self.default_threshold if number is None else float(number)), params

    async def text_contents(self, client, contents: list[str], params: dict | None = None) -> list[dict]:
        threshold, params = self.threshold(params or {})
        if not contents:  # client.rs:113-115: no request at all
            return []
        response = await self.post(client, CONTENTS, {"contents": contents, "detector_params": params})
        assert isinstance(response, list) and all(isinstance(ds, list) for ds in response)  # Vec<Vec<..>>
        # client.rs:126-144 zips chunks with the response: a short answer would silently drop contents
        assert len(response) == len(contents), (len(response), len(contents))
        detections = []
        for index, ds in enumerate(response):
            for d in ds:
                detections.append({**parse_detection(d, contents=True), "content": index})
        return [d for d in detections if d["score"] >= threshold]  # tasks.rs:223

    async def text_generation(self, client, prompt: str, generated_text: str, params: dict | None = None) -> list[dict]:
        threshold, params = self.threshold(params or {})
        response = await self.post(client, GENERATION, {"prompt": prompt, "generated_text": generated_text,
                                                        "detector_params": params})
        assert isinstance(response, list)
        return [d for d in (parse_detection(d, contents=False) for d in response) if d["score"] >= threshold]  # :350

    async def health(self, client) -> tuple[str, int, str | None]:
        """http.rs:244-308: GET {base}/health (the base URL joined with "health", http.rs:133); 200 with a body that
        parses as ``OptionalHealthCheckResponseBody`` (health.rs:111-118, status UPPERCASE: health.rs:13) gives its
        status, 200 without one HEALTHY; 5xx UNHEALTHY, 4xx (a missing route) UNKNOWN."""
        r = await client.get(self.url + "/health")
        if r.status_code == 200:
            try:
                body = r.json()
                status = body["status"]
                assert status in ("HEALTHY", "UNHEALTHY", "UNKNOWN")
                return status, 200, None if status == "HEALTHY" else body.get("reason")
            except (ValueError, KeyError, TypeError, AssertionError):
                return "HEALTHY", 200, None
        return ("UNHEALTHY" if 500 <= r.status_code < 600 else "UNKNOWN"), r.status_code, r.reason_phrase


def read_error(r: httpx.Response) -> DetectorError:
    """detector.rs:189-196 and 329-333: a non-200 body is read as ``DetectorError {code: u16, message: String}``;
    if that fails the orchestrator's user sees the status with an empty message."""
    try:
        body = r.json()
        code, message = body["code"], body["message"]
        assert isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 999 and isinstance(message, str)
        return DetectorError(code, message)
    except (ValueError, KeyError, TypeError, AssertionError):
        return DetectorError(r.status_code, "")


def test_the_orchestrator_cuts_every_contents_score_by_its_own_threshold_many_clients_at_once(sidecar):
    """The orchestrator strips ``threshold`` and keeps score >= its threshold (request's, else default_threshold):
    every scored content must come back with its score for that cut to apply; blank contents come back empty
    without failing the rest of the document."""
    contents = QUESTIONS + ["", "   \n"]
    risk = [1 - prompt_p(sidecar, q) for q in QUESTIONS]
    middle = sorted(risk)[2]
    cases = [(default, params) for default in (0.0, middle, 1.01) for params in ({}, {"threshold": middle},
                                                                              {"threshold": "high"})]

    async def one(client, i):
        default, params = cases[i % len(cases)]
        shift = i % len(contents)
        mine = contents[shift:] + contents[:shift]
        got = await Orchestrator(sidecar.url, default_threshold=default).text_contents(client, mine, params)
        return mine, default, params, got

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(3 * len(cases))))

    for mine, default, params, got in asyncio.run(main()):
        cut = params["threshold"] if isinstance(params.get("threshold"), float) else default
        want = {i: risk[QUESTIONS.index(t)] for i, t in enumerate(mine) if t in QUESTIONS and risk[QUESTIONS.index(t)] >= cut}
        assert {d["content"]: d["score"] for d in got} == pytest.approx(want, abs=1e-5), (default, params)
        for d in got:
            text = mine[d["content"]]
            assert (d["start"], d["end"], d["text"]) == (0, len(text), text)
            assert d["metadata"]["probability"] == pytest.approx(1 - d["score"], abs=1e-9)
            assert d["metadata"]["scored"] == "prompt" and d["metadata"]["truncated"] is False


def test_empty_contents_and_empty_texts_are_valid_requests(sidecar):
    """The spec sets no minItems on ``contents`` and no minLength on ``prompt`` / ``generated_text``."""
    headers = {"detector-id": "valueprobe"}
    assert httpx.post(sidecar.url + CONTENTS, json={"contents": []}, headers=headers, timeout=60).json() == []
    assert httpx.post(sidecar.url + CONTENTS, json={"contents": [""]}, headers=headers, timeout=60).json() == [[]]
    blank = httpx.post(sidecar.url + GENERATION, json={"prompt": "", "generated_text": ""}, headers=headers, timeout=60)
    assert blank.status_code == 200 and blank.json() == []
    unanswered = httpx.post(sidecar.url + GENERATION, json={"prompt": QUESTIONS[0], "generated_text": ""},
                            headers=headers, timeout=60)
    (d,) = unanswered.json()
    assert d["metadata"]["scored"] == "prompt" and d["score"] == pytest.approx(1 - prompt_p(sidecar, QUESTIONS[0]), abs=1e-5)


def test_the_generation_detector_through_the_orchestrator_scores_the_generated_text(sidecar):
    want = [1 - answer_p(sidecar, q, a) for q, a in zip(QUESTIONS, ANSWERS)]

    async def one(client, i):
        orchestrator = Orchestrator(sidecar.url, default_threshold=0.0)
        k = i % len(QUESTIONS)
        return k, await orchestrator.text_generation(client, QUESTIONS[k], ANSWERS[k])

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(12)))

    for k, (d,) in asyncio.run(main()):
        assert d["score"] == pytest.approx(want[k], abs=1e-5)
        assert (d["detection"], d["detection_type"], d["metadata"]["scored"]) == ("low_confidence", "confidence", "answer")
    above = Orchestrator(sidecar.url, default_threshold=max(want) + 1e-6)

    async def none_above():
        async with httpx.AsyncClient(timeout=60) as client:
            return await above.text_generation(client, QUESTIONS[0], ANSWERS[0])

    assert asyncio.run(none_above()) == []


def test_a_too_long_content_is_cut_from_the_left_not_refused(sidecar):
    """A whole document (the whole_doc_chunker) longer than the sidecar takes is scored on its end, where a
    question is asked, and says so, instead of failing the document."""
    r = httpx.post(sidecar.url + CONTENTS, headers={"detector-id": "x"}, timeout=60,
                   json={"contents": [LONG, QUESTIONS[0]]})
    assert r.status_code == 200, r.text
    (long,), (short,) = r.json()
    assert long["metadata"]["truncated"] is True and short["metadata"]["truncated"] is False
    assert (long["start"], long["end"]) == (0, len(LONG))
    assert long["metadata"]["probability"] == pytest.approx(prompt_p(sidecar, LONG[-MAX_CHARS:]), abs=1e-5)
    tokens = "~" * (MAX_CHARS - 1) + "?"  # within the characters, but (unknown to the tiny tokenizer) over the context
    r = httpx.post(sidecar.url + CONTENTS, headers={"detector-id": "x"}, timeout=60, json={"contents": [tokens]})
    assert r.status_code == 200 and r.json()[0][0]["metadata"]["truncated"] is True, r.text
    refused = httpx.post(sidecar.url + "/v1/confidence", json={"prompt": tokens}, timeout=60)
    assert refused.status_code == 400 and "context" in refused.json()["error"]["message"]  # it did not fit whole


def test_a_document_of_more_contents_than_one_admission_is_scored_whole(sidecar):
    """The orchestrator sends every chunk of a document in one request (client.rs:109-119): more than the 256 prompts
    one admission takes are scored in several, in order; past 4096 the request is refused as a validation error."""
    want = {q: 1 - prompt_p(sidecar, q) for q in QUESTIONS}
    contents = [QUESTIONS[i % len(QUESTIONS)] if i % 7 else "" for i in range(600)]
    r = httpx.post(sidecar.url + CONTENTS, headers={"detector-id": "x"}, json={"contents": contents}, timeout=300)
    assert r.status_code == 200 and len(r.json()) == len(contents), r.text[:300]
    for text, detections in zip(contents, r.json()):
        assert [d["score"] for d in detections] == (pytest.approx([want[text]], abs=1e-5) if text else [])
    over = httpx.post(sidecar.url + CONTENTS, headers={"detector-id": "x"}, json={"contents": ["a?"] * 4097}, timeout=60)
    assert (over.status_code, read_error(over).code) == (422, 422) and "4096" in read_error(over).message


@pytest.mark.parametrize("request_kwargs,status,says", [
    (dict(json={"contents": ["a?"]}), 422, "detector-id"),  # the spec: header required
    (dict(content=b'{"contents": ["a?"', headers={"detector-id": "x", "content-type": "application/json"}), 422, "JSON"),
    (dict(json={"contents": "a?"}, headers={"detector-id": "x"}), 422, "contents"),
    (dict(json={"contents": [1]}, headers={"detector-id": "x"}), 422, "contents"),
    (dict(json={}, headers={"detector-id": "x"}), 422, "contents"),
])
def test_errors_reach_the_orchestrator_with_their_status_and_message(sidecar, request_kwargs, status, says):
    r = httpx.post(sidecar.url + CONTENTS, timeout=60, **request_kwargs)
    error = read_error(r)
    assert (r.status_code, error.code) == (status, status) and says.lower() in error.message.lower(), r.text


def test_generation_errors_missing_routes_and_methods_answer_in_the_detector_error_shape(sidecar):
    missing = httpx.post(sidecar.url + GENERATION, json={"prompt": "a?"}, headers={"detector-id": "x"}, timeout=60)
    assert (missing.status_code, read_error(missing).code) == (422, 422) and "generated_text" in read_error(missing).message
    no_header = httpx.post(sidecar.url + GENERATION, json={"prompt": "a?", "generated_text": "b"}, timeout=60)
    assert read_error(no_header).code == 422 and "detector-id" in read_error(no_header).message
    chat = httpx.post(sidecar.url + "/api/v1/text/chat", json={"messages": []}, headers={"detector-id": "x"}, timeout=60)
    assert (chat.status_code, read_error(chat).code) == (404, 404) and read_error(chat).message  # spec: 404 Error
    wrong = httpx.get(sidecar.url + CONTENTS, timeout=60)
    assert (wrong.status_code, read_error(wrong).code, wrong.headers["allow"]) == (405, 405, "POST")


def test_the_orchestrators_health_check_reads_healthy_and_unhealthy(sidecar, artifact_file):
    from prometheus_client import CollectorRegistry

    from valueprobe.server.app import create_app
    from valueprobe.server.settings import Settings

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            ready = await Orchestrator(sidecar.url).health(client)
        loading = create_app(Settings(artifact=str(artifact_file)), registry=CollectorRegistry())  # lifespan not run
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=loading), timeout=60) as client:
            unready = await Orchestrator("http://sidecar").health(client)
        return ready, unready

    ready, unready = asyncio.run(main())
    assert ready == ("HEALTHY", 200, None)
    assert unready[:2] == ("UNHEALTHY", 503)


# The detector API's schemas, transcribed from docs/api/openapi_detector_api.yaml @ a33322a (paths 12-128 and
# 235-243, components 399-578; examples and titles left out). The spec's facts, not a copy of the file.
_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_DETECTOR_ID = {"name": "detector-id", "in": "header", "required": True, "schema": {"type": "string"}}
DETECTOR_SPEC = {
    "openapi": "3.0.1",
    "info": {"title": "Detectors API", "version": "0.0.1"},
    "paths": {
        CONTENTS: {"post": {
            "operationId": "text_content_analysis_unary_handler", "parameters": [_DETECTOR_ID],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ContentAnalysisHttpRequest"}}}},
            "responses": {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {
                "type": "array", "items": {"$ref": "#/components/schemas/ContentsAnalysisResponse"}}}}},
                "404": _ERROR, "422": _ERROR}}},
        GENERATION: {"post": {
            "operationId": "generation_analysis_unary_handler", "parameters": [_DETECTOR_ID],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/GenerationAnalysisHttpRequest"}}}},
            "responses": {"200": {"description": "Successful Response", "content": {"application/json": {"schema": {
                "type": "array", "items": {"$ref": "#/components/schemas/GenerationAnalysisResponse"}}}}},
                "404": _ERROR, "422": _ERROR}}},
        "/health": {"get": {"operationId": "health", "responses": {"200": {"description": "Healthy"}}}},
    },
    "components": {"schemas": {
        "Evidence": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "value": {"type": "string"}, "score": {"type": "number"}}},
        "EvidenceObj": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "value": {"type": "string"}, "score": {"type": "number"},
            "evidence": {"anyOf": [{"type": "array", "items": {"$ref": "#/components/schemas/Evidence"}}]}}},
        "GenerationAnalysisHttpRequest": {"type": "object", "required": ["prompt", "generated_text"], "properties": {
            "prompt": {"type": "string"}, "generated_text": {"type": "string"},
            "detector_params": {"type": "object", "default": {}}}},
        "GenerationAnalysisResponse": {"type": "object", "required": ["detection", "detection_type", "score"],
                                       "properties": {
            "detection": {"type": "string"}, "detection_type": {"type": "string"}, "score": {"type": "number"},
            "evidence": {"anyOf": [{"type": "array", "items": {"$ref": "#/components/schemas/EvidenceObj"}}]},
            "metadata": {"type": "object", "default": {}}}},
        "Error": {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "number"}, "message": {"type": "string"}}},
        "ContentAnalysisHttpRequest": {"type": "object", "required": ["contents"], "properties": {
            "contents": {"type": "array", "items": {"type": "string"}},
            "detector_params": {"type": "object", "default": {}}}},
        "ContentsAnalysisResponse": {"type": "array", "items": {"$ref": "#/components/schemas/ContentAnalysisResponse"}},
        "ContentAnalysisResponse": {"type": "object", "required": ["start", "end", "detection", "detection_type", "score"],
                                    "properties": {
            "start": {"type": "integer"}, "end": {"type": "integer"}, "text": {"type": "string"},
            "detection": {"type": "string"}, "detection_type": {"type": "string"}, "score": {"type": "number"},
            "evidence": {"anyOf": [{"type": "array", "items": {"$ref": "#/components/schemas/EvidenceObj"}}]},
            "metadata": {"type": "object", "default": {}}}},
    }},
}


def _conforms(instance, schema) -> None:
    import jsonschema

    jsonschema.validate(instance, {**schema, "components": DETECTOR_SPEC["components"]})


def test_requests_generated_from_the_detector_spec_get_the_answers_it_documents(sidecar):
    """schemathesis over the transcribed spec: every valid request (any strings, any detector_params object, no
    contents, empty texts) gets 200 and a body of the documented response schema; every invalid one (a missing
    header, a wrong type, a missing field) gets 422 and an ``Error`` body. Sent by eight clients at once."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_dict(DETECTOR_SPEC)
    cases = {mode: [] for mode in GenerationMode}
    for mode in GenerationMode:
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        @given(case=schema.as_strategy(mode))
        def collect(case):
            if case.method.upper() == "POST":
                cases[mode].append(case)

        collect()

    def send(case):
        kwargs = case.as_transport_kwargs(base_url=sidecar.url)
        body = kwargs.pop("data", None)
        for unused in ("verify", "allow_redirects"):
            kwargs.pop(unused, None)
        return httpx.request(kwargs.pop("method"), kwargs.pop("url"), content=body, timeout=120, **kwargs)

    with ThreadPoolExecutor(8) as pool:
        sent = {mode: list(pool.map(send, cases[mode])) for mode in GenerationMode}
    responses = DETECTOR_SPEC["paths"]
    assert len(sent[GenerationMode.POSITIVE]) >= 40 and len(sent[GenerationMode.NEGATIVE]) >= 20
    for case, r in zip(cases[GenerationMode.POSITIVE], sent[GenerationMode.POSITIVE]):
        assert r.status_code == 200, f"{case.path} {case.headers} {case.body!r:.300} -> {r.status_code} {r.text[:300]}"
        _conforms(r.json(), responses[case.path]["post"]["responses"]["200"]["content"]["application/json"]["schema"])
        if case.path == CONTENTS:
            assert len(r.json()) == len(case.body["contents"])
    for case, r in zip(cases[GenerationMode.NEGATIVE], sent[GenerationMode.NEGATIVE]):
        assert r.status_code == 422, f"{case.path} {case.headers} {case.body!r:.300} -> {r.status_code} {r.text[:300]}"
        _conforms(r.json(), {"$ref": "#/components/schemas/Error"})
        assert r.json()["code"] == 422 and r.json()["message"]


# -- TEI /predict (and /classify, the same route) ------------------------------------------------------------------
def tei_reads(inputs):
    """``PredictInput`` as TEI's visitor reads it (types.rs:40-137): a string is one input; a list whose first item is
    a string is one input of one or two strings (a pair), more is an error (:105); a list of lists is a batch of
    [text] or [text, text] (:75-88); an empty list is an error (:95). ``("single", seq)`` / ``("batch", seqs)`` or
    ``None`` where TEI refuses."""
    if isinstance(inputs, str):
        return "single", (inputs,)
    if not isinstance(inputs, list) or not inputs:
        return None
    if isinstance(inputs[0], str):
        if len(inputs) > 2 or not all(isinstance(x, str) for x in inputs):
            return None
        return "single", tuple(inputs)
    if not all(isinstance(x, list) and 1 <= len(x) <= 2 and all(isinstance(s, str) for s in x) for x in inputs):
        return None
    return "batch", [tuple(x) for x in inputs]


def predictions(body) -> list[dict]:
    """``Vec<Prediction>`` (types.rs:228-233: score, label) in TEI's order (server.rs:160-162: highest first)."""
    assert isinstance(body, list) and all(isinstance(x, dict) for x in body), body
    for x in body:
        assert isinstance(x["label"], str) and isinstance(x["score"], (int, float))
    assert [x["score"] for x in body] == sorted((x["score"] for x in body), reverse=True)
    return body


@pytest.mark.parametrize("path", ["/classify", "/predict"])
def test_tei_inputs_are_read_as_tei_reads_them(sidecar, path):
    forms = [QUESTIONS[0], [QUESTIONS[1]], [QUESTIONS[2], ANSWERS[2]], [[QUESTIONS[0]], [QUESTIONS[3], ANSWERS[3]],
                                                                         [QUESTIONS[4]]], [[QUESTIONS[1], ANSWERS[1]]]]

    def expected(seq):
        return prompt_p(sidecar, seq[0]) if len(seq) == 1 else answer_p(sidecar, *seq)

    for inputs in forms:
        kind, read = tei_reads(inputs)
        r = httpx.post(sidecar.url + path, json={"inputs": inputs}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        groups = [predictions(body)] if kind == "single" else [predictions(b) for b in body]  # PredictResponse, :237-240
        seqs = [read] if kind == "single" else read
        assert len(groups) == len(seqs)
        for labels, seq in zip(groups, seqs):
            scores = {x["label"]: x["score"] for x in labels}
            assert scores["confident"] == pytest.approx(expected(seq), abs=1e-5)
            assert scores["confident"] + scores["not_confident"] == pytest.approx(1, abs=1e-9)


@pytest.mark.parametrize("inputs", [[], ["a?", "b?", "c?"], [["a?", "b?", "c?"]], ["a?", ["b?"]], [[]], 3, None])
def test_inputs_tei_refuses_are_a_validation_error_in_teis_shape(sidecar, inputs):
    assert tei_reads(inputs) is None
    r = httpx.post(sidecar.url + "/predict", json={"inputs": inputs}, timeout=60)
    body = r.json()
    # ErrorResponse {error: String, error_type: ErrorType} (lib.rs:589-603; no serde rename, so "Validation")
    assert r.status_code == 422 and body["error_type"] == "Validation" and isinstance(body["error"], str) and body["error"]


def test_truncate_cuts_the_question_from_the_left_unless_asked_otherwise(sidecar):
    refused = httpx.post(sidecar.url + "/classify", json={"inputs": LONG}, timeout=60)
    assert refused.status_code == 400 and "limit" in refused.json()["error"], refused.text
    for direction, kept in ((None, LONG[-MAX_CHARS:]), ("left", LONG[-MAX_CHARS:]), ("Right", LONG[:MAX_CHARS])):
        body = {"inputs": LONG, "truncate": True, **({"truncation_direction": direction} if direction else {})}
        r = httpx.post(sidecar.url + "/classify", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert {x["label"]: x["score"] for x in r.json()}["confident"] == pytest.approx(prompt_p(sidecar, kept), abs=1e-5)
    over_context = "~" * (MAX_CHARS - 1) + "?"
    assert httpx.post(sidecar.url + "/classify", json={"inputs": over_context}, timeout=60).status_code == 400
    assert httpx.post(sidecar.url + "/classify", json={"inputs": over_context, "truncate": True}, timeout=60).status_code == 200


def test_raw_scores_are_the_two_class_logits_of_the_probability(sidecar):
    p = prompt_p(sidecar, QUESTIONS[0])
    raw = httpx.post(sidecar.url + "/predict", json={"inputs": QUESTIONS[0], "raw_scores": True}, timeout=60).json()
    z = {x["label"]: x["score"] for x in predictions(raw)}
    assert 1 / (1 + math.exp(z["not_confident"] - z["confident"])) == pytest.approx(p, abs=1e-6)


# -- huggingface_hub.InferenceClient (the real client) ---------------------------------------------------------------
def test_inference_client_text_classification_gets_both_labels(sidecar):
    from huggingface_hub import AsyncInferenceClient, InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    client = InferenceClient(base_url=sidecar.url + "/classify")
    want = [prompt_p(sidecar, q) for q in QUESTIONS]
    out = client.text_classification(QUESTIONS[0])
    assert {o.label for o in out} == {"confident", "not_confident"}
    assert {o.label: o.score for o in out}["confident"] == pytest.approx(want[0], abs=1e-5)
    (top,) = client.text_classification(QUESTIONS[0], top_k=1)
    assert top.label == out[0].label and top.score == pytest.approx(out[0].score)
    logits = {o.label: o.score for o in client.text_classification(QUESTIONS[0], function_to_apply="none")}
    assert logits["not_confident"] == 0 and logits["confident"] == pytest.approx(math.log(want[0] / (1 - want[0])), abs=1e-4)
    with pytest.raises(HfHubHTTPError, match="the question is empty"):  # our reason, as the client shows it
        client.text_classification("   ")

    async def main():
        aclient = AsyncInferenceClient(base_url=sidecar.url + "/classify", timeout=120)
        return await asyncio.gather(*(aclient.text_classification(QUESTIONS[i % len(QUESTIONS)]) for i in range(16)))

    for i, labels in enumerate(asyncio.run(main())):
        assert {o.label: o.score for o in labels}["confident"] == pytest.approx(want[i % len(QUESTIONS)], abs=1e-5)


# -- vLLM Semantic Router's prompt_guard http_classify backend -------------------------------------------------------
MAPPING = {"confident": 0, "not_confident": 1}  # its jailbreak_mapping_path file: label_to_idx
POSITIVE_LABELS = ["not_confident"]


def semantic_router_classify(url: str, text: str, client: httpx.Client) -> list[float]:
    """http_classifier.go: POST {base}/classify ``{"inputs": text}`` (:127-129, :158-175) with a 5 s timeout (:97);
    a non-2xx is an error (:190-192); the body is ``[{label, score}]`` (:131-134, :194-200, not nested); every
    configured label exactly once, each score finite in [0, 1], the sum within 0.02 of 1 (:213-266, :21)."""
    r = client.post(url + "/classify", json={"inputs": text},
                    headers={"Content-Type": "application/json", "Accept": "application/json"}, timeout=5)
    assert 200 <= r.status_code < 300, r.text
    scores = r.json()
    assert isinstance(scores, list) and scores, scores
    probabilities, seen = [0.0] * len(MAPPING), [False] * len(MAPPING)
    for s in scores:
        idx = MAPPING[s["label"]]  # a label outside the mapping is an error (:252-256)
        assert not seen[idx], f"duplicate label {s['label']}"  # :257-259
        assert math.isfinite(s["score"]) and 0 <= s["score"] <= 1  # :260-263
        seen[idx], probabilities[idx] = True, s["score"]
    assert all(seen)  # :230-237
    assert abs(sum(probabilities) - 1) <= 0.02  # :239-242
    return probabilities


def jailbreak_risk(probabilities: list[float]) -> float:
    """classifier_jailbreak_risk.go:72-88: the summed probability of positive_labels."""
    return sum(probabilities[MAPPING[label]] for label in POSITIVE_LABELS)


def test_semantic_router_reads_every_label_once_and_flags_below_the_minimum_confidence(sidecar):
    min_confidence = 0.5
    threshold = 1 - min_confidence  # prompt_guard.threshold: risk = 1 - P >= threshold  <=>  P <= min_confidence
    want = [prompt_p(sidecar, q) for q in QUESTIONS]

    def one(i):
        with httpx.Client() as client:
            started = time.perf_counter()
            probabilities = semantic_router_classify(sidecar.url, QUESTIONS[i % len(QUESTIONS)], client)
            return i, probabilities, time.perf_counter() - started

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    for i, probabilities, seconds in results:
        p = want[i % len(QUESTIONS)]
        risk = jailbreak_risk(probabilities)
        assert risk == pytest.approx(1 - p, abs=1e-5)
        assert (risk >= threshold) == (1 - p >= threshold)  # classifier_jailbreak_risk.go:107-110
        assert seconds < 5


# -- everyone at once ------------------------------------------------------------------------------------------------
def test_every_peer_at_once_gets_its_own_answers(sidecar):
    """Orchestrator contents and generation, TEI batches, Semantic Router and InferenceClient calls interleaved (48
    clients): each answer is the one its own request gets alone."""
    from huggingface_hub import AsyncInferenceClient

    prompt = {q: prompt_p(sidecar, q) for q in QUESTIONS}
    answer = {(q, a): answer_p(sidecar, q, a) for q, a in zip(QUESTIONS, ANSWERS)}
    inference = AsyncInferenceClient(base_url=sidecar.url + "/classify", timeout=120)

    async def one(client, i):
        k = i % len(QUESTIONS)
        q, a = QUESTIONS[k], ANSWERS[k]
        kind = i % 5
        if kind == 0:
            mine = QUESTIONS[k:] + QUESTIONS[:k]
            got = await Orchestrator(sidecar.url, default_threshold=0.0).text_contents(client, mine)
            assert [d["score"] for d in got] == pytest.approx([1 - prompt[t] for t in mine], abs=1e-5)
        elif kind == 1:
            (d,) = await Orchestrator(sidecar.url, default_threshold=0.0).text_generation(client, q, a)
            assert d["score"] == pytest.approx(1 - answer[(q, a)], abs=1e-5)
        elif kind == 2:
            r = await client.post(sidecar.url + "/predict", json={"inputs": [[q], [q, a]]})
            (single, pair) = r.json()
            assert {x["label"]: x["score"] for x in single}["confident"] == pytest.approx(prompt[q], abs=1e-5)
            assert {x["label"]: x["score"] for x in pair}["confident"] == pytest.approx(answer[(q, a)], abs=1e-5)
        elif kind == 3:
            r = await client.post(sidecar.url + "/classify", json={"inputs": q}, timeout=5)
            assert {x["label"]: x["score"] for x in r.json()}["not_confident"] == pytest.approx(1 - prompt[q], abs=1e-5)
        else:
            labels = await inference.text_classification(q)
            assert {o.label: o.score for o in labels}["confident"] == pytest.approx(prompt[q], abs=1e-5)

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(one(client, i) for i in range(48)))

    asyncio.run(main())


# -- NeMo Guardrails' custom action (docs/nemo_guardrails_action.py) -------------------------------------------------
async def nemo_runs_action(fn, action_params: dict, context: dict):
    """How NeMo Guardrails (NVIDIA/NeMo-Guardrails, Colang 1.0) calls a registered action, from its code:
    ``Runtime._process_start_action`` (nemoguardrails/colang/v1_0/runtime/runtime.py @ 0491460) takes the Colang
    call's keyword arguments, replaces a ``"$name"`` string by that context variable, and adds ``context`` when the
    function's signature has that parameter; ``ActionDispatcher.execute_action`` (nemoguardrails/actions/
    action_dispatcher.py @ 01b78b2) calls ``fn(**params)``, awaits a coroutine, and turns an exception into the
    status "failed" (the bot then says an internal error occurred)."""
    import inspect

    kwargs = {k: context.get(v[1:], v) if isinstance(v, str) and v.startswith("$") else v for k, v in action_params.items()}
    if "context" in inspect.signature(fn).parameters:
        kwargs["context"] = context
    try:
        result = fn(**kwargs)
        if inspect.iscoroutine(result):
            result = await result
        return result, "success"
    except Exception:  # noqa: BLE001 - what NeMo does
        return None, "failed"


def test_nemo_runs_the_documented_action_as_its_runtime_calls_it(sidecar, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "docs" / "nemo_guardrails_action.py"
    spec = importlib.util.spec_from_file_location("nemo_guardrails_action", path)
    action = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(action)
    want = {q: prompt_p(sidecar, q) for q in QUESTIONS}

    async def main():
        calls = []
        for i in range(20):  # the Colang flow's `execute check_confidence(threshold=..., url=$sidecar)`, many at once
            q = QUESTIONS[i % len(QUESTIONS)]
            threshold = want[q] + (1e-6 if i % 2 else -1e-6)
            calls.append(nemo_runs_action(action.check_confidence, {"threshold": threshold, "url": "$sidecar"},
                                          {"user_message": q, "sidecar": sidecar.url}))
        return await asyncio.gather(*calls)

    for i, (result, status) in enumerate(asyncio.run(main())):
        assert status == "success" and result is (i % 2 == 0)  # confident exactly when P >= threshold
