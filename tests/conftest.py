"""Shared fixtures: tiny models of several HF families built from configs, and a tiny trained tokenizer.

Nothing here touches a hub: tokenizers are trained in-process, models are random-initialised from configs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is the capital of France? Paris. A. B. C. D. Answer with the letter only.",
    "Which planet is largest? Jupiter is the largest planet in the solar system.",
    "Answer the question briefly, with just the answer. The quick brown fox jumps over the lazy dog.",
    "Question: how many legs does a spider have? Answer: eight. 0 1 2 3 4 5 6 7 8 9",
] * 20

# Prompts of mixed kinds and lengths (open, multiple choice, one word, longer than a small prefill chunk).
MIXED_PROMPTS = [
    "What is the capital of France?",
    {"question": "Which planet is largest?", "choices": ["Mars", "Jupiter", "Venus", "Earth"]},
    "fox",
    "Question: how many legs does a spider have? The quick brown fox jumps over the lazy dog, and the dog "
    "answers with the letter only, eight legs or six legs, which planet is largest?",
    {"question": "capital of France", "choices": ["Paris", "Rome"]},
]

# family -> config class and the kwargs that make it tiny
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)),
    "gemma": ("GemmaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=1, head_dim=8, max_position_embeddings=256)),
    "phi": ("PhiConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=256)),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=3, n_head=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       max_position_embeddings=256)),
    "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=256, word_embed_proj_dim=32)),
}


def build_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<eos>", model_input_names=["input_ids", "attention_mask"])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(family: str, vocab_size: int, seed: int = 0, **overrides):
    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(vocab_size=vocab_size, **{**kwargs, **overrides})
    config.pad_token_id = 1
    config.eos_token_id = 2
    config.bos_token_id = 2
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval()
    return model


def as_served(tok, folder, family: str = "qwen2"):
    """``tok`` as a served model folder gives it back: saved beside a ``family`` config and loaded by
    ``AutoTokenizer``. transformers 5 then builds the family's tokenizer class (Qwen2's splits digits, the
    in-memory one does not), so an artifact must be fitted with the tokenizer the folder gives, or the
    scheme-2 fingerprint (the prompts' token ids) refuses it, rightly."""
    from transformers import AutoTokenizer

    cls_name, kwargs = FAMILIES[family]
    getattr(transformers, cls_name)(vocab_size=len(tok), **kwargs).save_pretrained(folder)
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)



@pytest.fixture(autouse=True)
def _own_store(tmp_path_factory, monkeypatch):
    """Every test's sidecars keep requests, labels and promotions in a store of the test's own (the default, one
    SQLite file in the model cache, would let one test's promoted calibration be served in the next)."""
    if "VALUEPROBE_STORE" not in os.environ or os.environ["VALUEPROBE_STORE"].startswith("sqlite:///" + str(tmp_path_factory.getbasetemp())):
        folder = tmp_path_factory.mktemp("store")
        monkeypatch.setenv("VALUEPROBE_STORE", f"sqlite:///{folder / 'feedback.sqlite'}")

@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return as_served(build_tokenizer(), tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def qwen_model(tokenizer):
    return build_model("qwen2", len(tokenizer))


def synthetic_featureset(model, tokenizer, n: int = 160, seed: int = 0):
    """Real hidden states of ``model`` on ``n`` varied prompts, with labels planted on one neuron of layer 2.

    Plumbing only: the planted label makes probes learnable, it says nothing about real models.
    """
    import numpy as np

    from valueprobe.calibration.extract import FeatureSet
    from valueprobe.plugin.hooks import capture, with_position_ids
    from valueprobe.plugin.prompting import PromptFormat

    rng = np.random.default_rng(seed)
    words = "what is the capital of france which planet largest answer letter only fox lazy dog spider legs".split()
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) + "?" for _ in range(n)]
    fmt = PromptFormat()
    texts = [fmt.render(tokenizer, p) for p in prompts]
    tokenizer.padding_side = "left"
    feats = []
    for start in range(0, n, 32):
        enc = tokenizer(texts[start : start + 32], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad(), capture(model, "all") as cap:
            model(**with_position_ids(enc))
        n_layers = len(cap.batches[0])
        feats.append(torch.stack([cap.batches[0][l] for l in range(1, n_layers + 1)], dim=1))
    tokenizer.padding_side = "right"
    features = torch.cat(feats)
    signal = features[:, 1, 7].numpy() + 0.3 * rng.standard_normal(n) * features[:, 1, 7].numpy().std()
    labels = (signal > np.median(signal)).astype(int)
    rows = [
        {"id": f"q{i}", "dataset": "synthetic-a" if i % 2 else "synthetic-b", "kind": "choice", "label": int(labels[i]),
         "prediction": "A", "max_softmax": float(rng.uniform(0.25, 1)), "option_entropy": float(rng.uniform(0, 1.3)),
         "answer_logprob": float(-rng.uniform(0, 2)), "seq_logprob": None, "question_tokens": len(prompts[i])}
        for i in range(n)
    ]
    return FeatureSet(features, rows), prompts


@pytest.fixture(scope="session")
def fitted(qwen_model, tokenizer):
    """``(artifact_data, card, prompts)`` fitted on the tiny Qwen2 with planted labels."""
    from valueprobe.calibration.fit import FitConfig, fit_artifact
    from valueprobe.plugin.prompting import PromptFormat

    fs, prompts = synthetic_featureset(qwen_model, tokenizer)
    data, card = fit_artifact(qwen_model, tokenizer, fs, model_name="tiny-qwen2", prompt_format=PromptFormat(),
                              config=FitConfig(random_draws=10, progress=False))
    return data, card, prompts, fs


@pytest.fixture(scope="module")
def artifact_file(tmp_path_factory, fitted):
    """The tiny fitted artifact saved to a file (one per test module)."""
    from valueprobe.plugin import save_artifact
    from valueprobe.plugin.artifact import ArtifactData

    data, *_ = fitted
    path = tmp_path_factory.mktemp("artifact") / "probe.safetensors"
    save_artifact(ArtifactData(dict(data.tensors), dict(data.metadata)), path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory, fitted, qwen_model, tokenizer):
    """A folder a real sidecar serves from (:class:`Server`): the tiny Qwen2 saved as ``model/`` and its fitted
    artifact as ``probe.safetensors`` (one per test module)."""
    from valueprobe.plugin import save_artifact
    from valueprobe.plugin.artifact import ArtifactData

    folder = tmp_path_factory.mktemp("sidecar")
    qwen_model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    data, *_ = fitted
    save_artifact(ArtifactData(dict(data.tensors), dict(data.metadata)), folder / "probe.safetensors")
    return folder


def run_app(settings, model, tokenizer, scenario, *, timeout: float = 60):
    """Run ``scenario(client, app)`` against the sidecar in-process (lifespan on, ASGI transport) once ready."""
    import asyncio

    import httpx
    from prometheus_client import CollectorRegistry

    from valueprobe.server.app import create_app

    app = create_app(settings, registry=CollectorRegistry(), model=model, tokenizer=tokenizer)

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://sidecar", timeout=timeout) as client:
                for _ in range(200):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                return await scenario(client, app)

    return asyncio.run(main())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``valueprobe serve`` in a subprocess on a free loopback port, configured through ``VALUEPROBE_*``; ``assets``
    is a folder holding ``model/`` and ``probe.safetensors``."""

    def __init__(self, assets, **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.assets = assets
        env = {**os.environ, "VALUEPROBE_MODEL": str(assets / "model"), "VALUEPROBE_ARTIFACT": str(assets / "probe.safetensors"),
               "VALUEPROBE_PORT": str(self.port), "VALUEPROBE_DEFAULT_MAX_NEW_TOKENS": "8", "TOKENIZERS_PARALLELISM": "false",
               "OMP_NUM_THREADS": "1"}
        # each server its own store unless it is given one (replicas share a store by passing the same `store`)
        env["VALUEPROBE_STORE"] = f"sqlite:///{assets / f'store-{self.port}.sqlite'}"
        env.update({f"VALUEPROBE_{k.upper()}": str(v) for k, v in settings.items()})
        self.log = open(assets / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "valueprobe.cli", "serve", "--log-level", "warning"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def log_excerpt(self, limit: int = 6000) -> str:
        """The server's log for a failure message: from its first traceback (a vLLM engine's root cause is printed
        by its core process long before the tail) plus the tail, at most ``limit`` characters of each."""
        text = open(self.log.name, errors="replace").read()
        first = text.find("Traceback (most recent call last)")
        if first >= 0 and len(text) - first > limit:
            text = f"{text[first:first + limit]}\n[...]\n{text[-limit:]}"
        else:
            text = text[-limit:]
        # an engine killed for memory leaves no traceback of its own: say how much memory was left
        with contextlib.suppress(OSError):
            available = next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
            text += f"\n[{available.strip()} when the failure was read]"
        return text

    def wait_ready(self, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_excerpt()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(self.log_excerpt())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()




@contextlib.contextmanager
def poisoned(model, tokenizer, word: str = "zebra"):
    """While open, any row whose input holds ``word``'s first token gets NaN embeddings, so its hidden states (and
    everything read from them) are not finite, as a float16 overflow leaves them; other rows of a batch are
    untouched (attention never mixes rows)."""
    marker = tokenizer(word, add_special_tokens=False)["input_ids"][0]

    def hook(module, inputs, out):
        bad = (inputs[0] == marker).any(-1)
        if bad.any():
            out = out.clone()
            out[bad] = float("nan")
            return out

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(scope="session")
def answer_fitted(qwen_model, tokenizer):
    """``(artifact_data, card)``: an ``answer_end`` artifact fitted on the tiny Qwen2 (planted labels; the answer
    signals drawn at random): plumbing for confidence in given answers, not a quality claim."""
    from valueprobe.calibration.fit import FitConfig, fit_artifact
    from valueprobe.plugin.prompting import PromptFormat

    fs, _ = synthetic_featureset(qwen_model, tokenizer)
    import numpy as np

    rng = np.random.default_rng(3)
    for r in fs.rows:
        mean = float(-rng.uniform(0, 2))
        r.update(answer_mean_logprob=mean, answer_min_logprob=mean - float(rng.uniform(0, 2)),
                 answer_sum_logprob=3 * mean, answer_tokens=3, answer_end_prob=0.5, answer="A")
    return fit_artifact(qwen_model, tokenizer, fs, model_name="tiny-qwen2", prompt_format=PromptFormat(),
                        config=FitConfig(random_draws=5, progress=False), token_position="answer_end")


@pytest.fixture(scope="module")
def answer_artifact_file(tmp_path_factory, answer_fitted):
    from valueprobe.plugin import save_artifact
    from valueprobe.plugin.artifact import ArtifactData

    data, _ = answer_fitted
    path = tmp_path_factory.mktemp("answer-artifact") / "answer.safetensors"
    save_artifact(ArtifactData(dict(data.tensors), dict(data.metadata)), path)
    return path
