"""The shipped model as a new user meets it: the real Qwen2.5-Coder-1.5B-Instruct converted by the transformers
set-up installed, the shipped default artifact with its fingerprint check on, the README's examples scored and
served by both engines.

Marked ``shipped_model`` (deselect locally with ``-m "not shipped_model"``) and skipped where the model's packages
are not installed (``bash scripts/setup.sh --models`` installs them). CI installs them and points
``VALUEPROBE_CACHE`` at a new empty folder, so the conversion runs every time: a cache warmed by an older
transformers once hid a conversion change that made the shipped model refuse to serve for every new user.

``python tests/test_shipped_model.py`` rewrites ``tests/data/shipped-model-scores.json`` (the recorded values);
``--print`` only prints them (the test runs that in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import Server, free_port

from valueprobe.plugin.models import KNOWN_MODELS, ModelNotInstalledError

MODEL = "Qwen2.5-Coder-1.5B-Instruct"
RECORDED = Path(__file__).parent / "data" / "shipped-model-scores.json"
# The README's examples: its curl requests and its Python API block.
README_PROMPTS = {
    "peru": "What is the capital of Peru?",
    "two_plus_two": {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"]},
    "mona_lisa": [{"role": "user", "content": "Who painted the Mona Lisa?"}],
    "iliad": "Who wrote the Iliad?",
}
CHAT_MAX_TOKENS = 24


# The shipped small model (the cascade's first model) and its artifact: checked the same way, from the same empty cache.
SMALL = "Qwen2.5-Coder-0.5B-Instruct"
SMALL_ARTIFACT = "qwen2.5-coder-0.5b-instruct.safetensors"


def shipped_answer_artifact():
    from valueprobe.weights import answer_artifact_beside, default_artifact

    return answer_artifact_beside(default_artifact())


def _installed(name: str) -> bool:
    try:
        KNOWN_MODELS[name].part_paths()
        return True
    except ModelNotInstalledError:
        return False


pytestmark = [pytest.mark.shipped_model,
              pytest.mark.skipif(not _installed(MODEL), reason="the shipped model is not installed (setup.sh --models)")]


def score_readme_examples(model_name: str = MODEL) -> dict[str, float]:
    """Calibrated probability of each README example, with the model's shipped artifact and its check on."""
    from valueprobe.plugin import ValueProbe, load_model
    from valueprobe.weights import default_artifact

    model, tokenizer = load_model(model_name)
    path = default_artifact() if model_name == MODEL else default_artifact().with_name(SMALL_ARTIFACT)
    probe = ValueProbe.load(path)
    results = probe.score(model, tokenizer, list(README_PROMPTS.values()))  # check_fingerprint is on by default
    from valueprobe.weights import answer_artifact_beside

    beside = answer_artifact_beside(path)  # the answer-level artifact a sidecar of this model would serve with it
    if beside is not None:
        ValueProbe.load(beside).check_compatible(model, tokenizer, strict=True)
    return {name: round(r.probability, 4) for name, r in zip(README_PROMPTS, results)}


def scores_in_a_subprocess(model_name: str = MODEL) -> dict[str, float]:
    """:func:`score_readme_examples` in its own process: the 1.5B model (7 GB in float32) must not stay in the test
    process's heap while the sidecars below load it twice more."""
    out = subprocess.run([sys.executable, __file__, "--print", model_name], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(RECORDED.read_text())


@pytest.fixture(scope="module")
def served() -> dict:
    """Confidences each engine served, for the cross-engine comparison."""
    return {}


def test_shipped_artifact_loads_with_its_fingerprint_and_scores_the_readme_examples(recorded):
    scores = scores_in_a_subprocess()
    for name, p in scores.items():
        assert p == pytest.approx(recorded["scores"][name], abs=0.01), (name, p)


@pytest.mark.skipif(not _installed(SMALL), reason="the shipped small model is not installed (setup.sh --models)")
def test_the_small_models_artifact_loads_with_its_fingerprint_and_scores_the_readme_examples(recorded):
    scores = scores_in_a_subprocess(SMALL)
    for name, p in scores.items():
        assert p == pytest.approx(recorded["small"][name], abs=0.01), (name, p)


class Sidecar(Server):
    """``valueprobe serve`` exactly as the README starts it (default model and artifact), on a free port; waiting
    and stopping as :class:`conftest.Server`."""

    def __init__(self, tmp_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "serve.log", "w")
        # a new user's environment: no VLLM_* tuning left over from other tests (a 1 GiB KV cache from the vLLM
        # tests' settings once made vLLM refuse the 1.5B model's 32k context here)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
        env.update({"VALUEPROBE_PORT": str(self.port), "TOKENIZERS_PARALLELISM": "false"})
        self.proc = subprocess.Popen([sys.executable, "-m", "valueprobe.cli", "serve", *args], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_the_readme_curl_requests_are_answered_by_each_engine(engine, tmp_path, recorded, served):
    sidecar = Sidecar(tmp_path, "--engine", engine).wait_ready(timeout=900)
    try:
        confidence = httpx.post(sidecar.url + "/v1/confidence", json={"prompt": README_PROMPTS["peru"]}, timeout=120)
        chat = httpx.post(sidecar.url + "/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": README_PROMPTS["iliad"]}], "max_tokens": CHAT_MAX_TOKENS})
    finally:
        sidecar.stop()
    assert confidence.status_code == 200, confidence.text
    assert chat.status_code == 200, chat.text
    body = chat.json()
    choice = body["choices"][0]
    # the answer ends at the chat's end-of-turn token, whatever the tokenizer calls eos
    assert choice["finish_reason"] == "stop" and body["usage"]["completion_tokens"] < CHAT_MAX_TOKENS, body
    assert "homer" in choice["message"]["content"].lower(), body
    p_confidence = confidence.json()["probability"]
    p_chat = body["confidence"]["probability"]
    answer = body["confidence"]["answer"]
    if shipped_answer_artifact() is not None:  # found beside the default artifact, read by both engines
        assert answer is not None and 0 <= answer["probability"] <= 1, body
        assert answer["components"]["answer_tokens"] >= 1, body
    else:
        assert answer is None, body
    assert p_confidence == pytest.approx(recorded["scores"]["peru"], abs=0.01)
    assert p_chat == pytest.approx(recorded["scores"]["iliad"], abs=0.01)
    served[engine] = (p_confidence, p_chat, answer["probability"] if answer else None)
    if len(served) == 2:  # the vLLM engine's confidences equal the transformers engine's
        (a_conf, a_chat, a_ans), (b_conf, b_chat, b_ans) = served["transformers"], served["vllm"]
        assert abs(a_conf - b_conf) <= 0.01 and abs(a_chat - b_chat) <= 0.01, served
        assert (a_ans is None and b_ans is None) or abs(a_ans - b_ans) <= 0.01, served


if __name__ == "__main__":
    if sys.argv[1:2] == ["--print"]:  # the tests' subprocess: print the scores, write nothing
        print(json.dumps(score_readme_examples(sys.argv[2] if len(sys.argv) > 2 else MODEL)))
        sys.exit(0)
    import transformers

    RECORDED.write_text(json.dumps({
        "produced_by": "python tests/test_shipped_model.py",
        "transformers": transformers.__version__,
        "scores": score_readme_examples(),
        "small": score_readme_examples(SMALL),
    }, indent=2) + "\n")
    print(RECORDED.read_text())
