"""Explainer client over an in-process transformers causal LM (batched ``generate``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from saeforge.explainers.base import (
    ChatParams, ChatRequest, ChatResult, Continuation, Message, TokenLogprob, log_throughput,
)
from saeforge.explainers.cache import ResponseCache, request_key

log = logging.getLogger(__name__)


PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{% if not loop.last %}\n\n{% endif %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""The transcript for a tokenizer without a chat template (a base model such as the gemma3-270m GGUF)."""


class _StopStrings(StoppingCriteria):
    """Ends a row once its generated text (after ``start``) contains one of ``stop``.

    Decodes the generated tokens each step instead of transformers' ``stop_strings``, whose
    vocabulary preprocessing assumes a BPE-like tokenizer.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], start: int) -> None:
        self.tokenizer, self.stop, self.start = tokenizer, stop, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


class LocalChatClient:
    """Chat with a loaded ``(model, tokenizer)`` through its chat template.

    Requests with the same ``ChatParams`` are generated together in left-padded batches of at
    most ``max_batch``; greedy when ``temperature == 0``, else sampled under ``params.seed``
    (a sampled result depends on which requests share its batch). Successful results go to the
    same on-disk cache as :class:`~saeforge.explainers.openai_compat.OpenAICompatClient`.

    With ``prefill`` (the default) a request whose last message is from the assistant is rendered
    with ``continue_final_message=True``: the model continues that text and the result holds only
    the continuation.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_batch: int = 8,
        cache_dir: Path | str | None = None,
        name: str | None = None,
        prefill: bool = True,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.supports_prefill = bool(prefill)
        self.name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids: set[int] = set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else min(self.eos_ids, default=0)

    def __repr__(self) -> str:
        return (f"LocalChatClient(name={self.name!r}, max_batch={self.max_batch}, "
                f"prefill={self.supports_prefill}, cache={self.cache!r})")

    async def chat(self, messages: list[Message], params: ChatParams) -> ChatResult:
        """One request (a batch of one)."""
        return (await self.chat_many([(messages, params)], progress=False))[0]

    async def chat_many(
        self, requests: list[ChatRequest], progress: bool = True
    ) -> list[ChatResult]:
        """Cached results first, the rest in batches grouped by params; input order kept."""
        start = time.perf_counter()
        results: list[ChatResult | None] = [None] * len(requests)
        keys = [request_key(self.name, m, p) for m, p in requests] if self.cache else []
        groups: dict[ChatParams, list[int]] = defaultdict(list)
        for i, (_, params) in enumerate(requests):
            hit = self.cache.get(keys[i]) if self.cache else None
            if hit is not None:
                results[i] = hit
            else:
                groups[params].append(i)
        with tqdm(total=len(requests), desc=f"explain ({self.name})", disable=not progress) as bar:
            bar.update(sum(r is not None for r in results))
            for params, indices in groups.items():
                prompts = {i: self._prompt_ids(requests[i][0]) for i in indices}
                indices = sorted(indices, key=lambda i: len(prompts[i]))  # less padding
                for b in range(0, len(indices), self.max_batch):
                    chunk = indices[b : b + self.max_batch]
                    batch = [prompts[i] for i in chunk]
                    try:
                        outs = await asyncio.to_thread(self._generate, batch, params)
                    except Exception as err:  # noqa: BLE001 - a client reports, never raises
                        log.exception("local generation failed")
                        outs = [ChatResult(text="", status="error", error=f"{type(err).__name__}: {err}")] * len(chunk)
                    for i, out in zip(chunk, outs):
                        results[i] = out
                        if self.cache:
                            self.cache.put(keys[i], out)
                    bar.update(len(chunk))
        final = [r for r in results if r is not None]
        assert len(final) == len(requests)
        log_throughput(log, final, time.perf_counter() - start)
        return final

    async def continuation_logprobs_many(
        self, pairs: list[Continuation], progress: bool = True
    ) -> list[ChatResult]:
        """Log-probabilities of each continuation's tokens after its context, by a forward pass
        in right-padded batches of ``max_batch``. The context is tokenized as a prompt (with the
        tokenizer's special tokens), the continuation on its own (without them), and the two id
        lists are joined, so the scored tokens are exactly the continuation's."""
        start = time.perf_counter()
        results: list[ChatResult] = []
        with tqdm(total=len(pairs), desc=f"prompt logprobs ({self.name})", disable=not progress) as bar:
            for b in range(0, len(pairs), self.max_batch):
                chunk = pairs[b : b + self.max_batch]
                try:
                    results += await asyncio.to_thread(self._continuation_logprobs, chunk)
                except Exception as err:  # noqa: BLE001 - a client reports, never raises
                    log.exception("local prompt scoring failed")
                    results += [ChatResult(text="", status="error", error=f"{type(err).__name__}: {err}")] * len(chunk)
                bar.update(len(chunk))
        log_throughput(log, results, time.perf_counter() - start)
        return results

    @torch.inference_mode()
    def _continuation_logprobs(self, pairs: list[Continuation]) -> list[ChatResult]:
        rows, spans = [], []
        for context, continuation in pairs:
            ctx = list(self.tokenizer(context)["input_ids"]) if context else []
            cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
            if not ctx:  # the first token needs something before it
                ctx = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_id]
            rows.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
        width = max(len(r) for r in rows)
        device = next(self.model.parameters()).device
        ids = torch.tensor([r + [self.pad_id] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logprobs = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        out = []
        for row, (context, continuation), (s, e) in zip(range(len(rows)), pairs, spans):
            targets = ids[row, s:e]
            values = logprobs[row, s - 1 : e - 1].gather(-1, targets[:, None])[:, 0].tolist()
            out.append(ChatResult(text=continuation, logprobs=[
                TokenLogprob(token=self.tokenizer.decode([t]), logprob=v, top={})
                for t, v in zip(targets.tolist(), values)]))
        return out

    def _prompt_ids(self, messages: list[Message]) -> list[int]:
        if self.supports_prefill and messages and messages[-1]["role"] == "assistant":
            template = {"continue_final_message": True, "add_generation_prompt": False}
        else:
            template = {"add_generation_prompt": True}
        if not getattr(self.tokenizer, "chat_template", None):
            template["chat_template"] = PLAIN_CHAT_TEMPLATE  # a base model: a plain transcript
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, **template)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    @torch.inference_mode()
    def _generate(self, batch: list[list[int]], params: ChatParams) -> list[ChatResult]:
        """Left-pad ``batch``, generate, and cut each row at its first end-of-sequence token."""
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        device = next(self.model.parameters()).device
        sample = params.temperature > 0
        config = GenerationConfig(
            max_new_tokens=params.max_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids) or None,
            return_dict_in_generate=True,
            output_logits=params.logprobs,
        )
        with torch.random.fork_rng(devices=[]):
            if sample and params.seed is not None:
                torch.manual_seed(params.seed)
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([_StopStrings(self.tokenizer, params.stop, width)])
                if params.stop else None,
            )
        new_tokens = out.sequences[:, width:].cpu()
        logprobs = None
        if params.logprobs and out.logits:
            logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1).cpu()  # [B, T, V]
        results = []
        for row in range(len(batch)):
            ids = new_tokens[row].tolist()
            n = next((t + 1 for t, tok in enumerate(ids) if tok in self.eos_ids), len(ids))
            ids = ids[:n]
            text = self._decode(ids)
            if params.stop:
                text, ids = self._cut_at_stop(text, ids, params.stop)
            token_logprobs = self._token_logprobs(ids, logprobs[row], params) if logprobs is not None else None
            results.append(ChatResult(text=text, logprobs=token_logprobs))
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.eos_ids], skip_special_tokens=True)

    def _cut_at_stop(self, text: str, ids: list[int], stop: tuple[str, ...]) -> tuple[str, list[int]]:
        """The text before the first stop string (as OpenAI servers return it), and the tokens
        generated before the token that completed it."""
        cut = min((p for p in (text.find(s) for s in stop) if p >= 0), default=-1)
        if cut < 0:
            return text, ids
        k = next((k for k in range(1, len(ids) + 1) if any(s in self._decode(ids[:k]) for s in stop)), len(ids))
        return text[:cut], ids[: k - 1]

    def _token_logprobs(
        self, ids: list[int], logprobs: torch.Tensor, params: ChatParams
    ) -> list[TokenLogprob]:
        k = params.top_logprobs or 0
        entries = []
        for t, tok in enumerate(ids):
            top: dict[str, float] = {}
            if k:
                values, indices = logprobs[t].topk(k)
                top = {self.tokenizer.decode([i]): v for i, v in zip(indices.tolist(), values.tolist())}
            entries.append(
                TokenLogprob(token=self.tokenizer.decode([tok]), logprob=float(logprobs[t, tok]), top=top)
            )
        return entries
