"""Performance ratios of the probe, measured side by side in one run (interleaved repetitions, median and spread).

* end-to-end ``generate`` with the probe attached vs without -> overhead %;
* prompt-only scoring (``ValueProbe.score``) vs a bare full prefill forward of the same prompts -> ratio;
* the readout alone (k neurons -> calibrated probability), microseconds per sequence;
* prompt-only scoring throughput at batch sizes 1, 4, 16.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from valueprobe.plugin.hooks import with_position_ids

PROMPTS = [
    "What is the capital of Peru?", "Who wrote the Iliad?", "What is the boiling point of water in Kelvin?",
    "Which planet has the most moons?", "Who painted The Starry Night?", "What is the largest desert on Earth?",
    "In which year did the Berlin Wall fall?", "What is the chemical symbol for gold?",
    "How many bones are in the adult human body?", "Which element has atomic number 26?",
    "What is the longest river in Africa?", "Who discovered penicillin?", "What is the smallest prime number?",
    "Which ocean is the deepest?", "Who composed the Four Seasons?", "What is the currency of Japan?",
]


def _time(fn) -> float:
    # GPU work is asynchronous: wait for it on both sides of the clock
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def _spread(xs):
    q1, q3 = np.percentile(xs, [25, 75])
    return statistics.median(xs), q3 - q1


@torch.inference_mode()
def run(model, tokenizer, probe, *, reps: int = 5, new_tokens: int = 16, batch_sizes=(1, 4, 16), progress=print,
        check_fingerprint: bool = True):
    """The rows of the table, each ``(measurement, value, reference, ratio)``, on ``model``'s device.
    ``check_fingerprint=False`` times a model the artifact was not fitted on (e.g. random weights of the same
    architecture on a machine without the checkpoint): the numbers are timings only."""
    rows = []
    device = next(model.parameters()).device
    enc = probe.encode(tokenizer, PROMPTS[:4]).to(device)
    gen_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tokenizer.pad_token_id)
    model.generate(**enc, **gen_kwargs)  # warm-up
    bare, hooked = [], []
    for _ in range(reps):  # interleaved, so drift hits both arms alike
        bare.append(_time(lambda: model.generate(**enc, **gen_kwargs)))
        with probe.attach(model, tokenizer, check_fingerprint=check_fingerprint):
            hooked.append(_time(lambda: model.generate(**enc, **gen_kwargs)))
    (b, bs), (h, hs) = _spread(bare), _spread(hooked)
    rows.append(("generate, 4 prompts x %d tokens: probe attached / bare" % new_tokens, f"{h:.3f} s (IQR {hs:.3f})",
                 f"{b:.3f} s (IQR {bs:.3f})", f"{100 * (h / b - 1):+.2f}% overhead"))
    progress(rows[-1])

    prefill = with_position_ids(enc)
    model(**prefill, use_cache=False)
    full, scored = [], []
    for _ in range(reps):
        full.append(_time(lambda: model(**prefill, use_cache=False)))
        scored.append(_time(lambda: probe.score(model, tokenizer, PROMPTS[:4], batch_size=4,
                                                check_fingerprint=check_fingerprint)))
    (f, fs), (s, ss) = _spread(full), _spread(scored)
    rows.append(("prompt-only score / bare full prefill (4 prompts)", f"{s:.3f} s (IQR {ss:.3f})", f"{f:.3f} s (IQR {fs:.3f})",
                 f"{s / f:.3f}x"))
    progress(rows[-1])

    values = torch.randn(64, probe.k)
    probe.readout(values)
    per_seq = []
    for _ in range(max(reps, 5)):
        n = 200
        t = _time(lambda: [probe.readout(values[:1]) for _ in range(n)])
        per_seq.append(t / n * 1e6)
    batch_per_seq = []
    for _ in range(max(reps, 5)):
        batch_per_seq.append(_time(lambda: probe.readout(values)) / 64 * 1e6)
    r, rs = _spread(per_seq)
    rb, _ = _spread(batch_per_seq)
    rows.append(("readout (k neurons -> calibrated P), per sequence", f"{r:.1f} us (batch of 1)", f"{rb:.2f} us (batch of 64)",
                 "< 100 us target"))
    progress(rows[-1])

    base = None
    for bsz in batch_sizes:
        prompts = (PROMPTS * ((bsz // len(PROMPTS)) + 1))[:bsz]
        def score():
            return probe.score(model, tokenizer, prompts, batch_size=bsz, check_fingerprint=check_fingerprint)

        score()
        times = [_time(score) for _ in range(max(1, reps // 2))]
        t, ts = _spread(times)
        tput = bsz / t
        base = base or tput
        rows.append((f"prompt-only scoring throughput, batch {bsz}", f"{tput:.2f} prompts/s", f"IQR {ts:.3f} s",
                     f"{tput / base:.2f}x batch 1"))
        progress(rows[-1])
    return rows


def random_model(folder: str, dtype: str):
    """A model of ``folder``'s config with random weights (seeded), and its tokenizer: timings without the
    checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def torch_device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
