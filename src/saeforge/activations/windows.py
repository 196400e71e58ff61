"""Tokenise texts and pack them into fixed `ctx_len` windows."""

from __future__ import annotations

from typing import Any, Iterable

import torch


def pack_windows(
    texts: Iterable[str],
    tokenizer: Any,
    ctx_len: int,
    n_tokens: int,
    prepend_bos: bool = True,
    batch_texts: int = 256,
) -> torch.Tensor:
    """int32 [n_seq, ctx_len] windows, n_seq = ceil(n_tokens / ctx_len).

    Documents are concatenated with EOS between them and cut into windows (the sparsify/delphi
    convention). With `prepend_bos`, every window starts with BOS followed by ctx_len-1 text tokens.
    Raises if the corpus yields no tokens; uses fewer windows (with a warning) if it runs out.
    """
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be >= 2, got {ctx_len}")
    n_seq = -(-n_tokens // ctx_len)
    body = ctx_len - 1 if prepend_bos else ctx_len
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=true but the tokenizer has neither a BOS nor an EOS token")
    eos = tokenizer.eos_token_id
    windows: list[list[int]] = []
    buffer: list[int] = []
    batch: list[str] = []

    def flush(batch: list[str]) -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            if eos is not None:
                buffer.append(eos)

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_texts:
            flush(batch)
            batch = []
            while len(buffer) >= body and len(windows) < n_seq:
                windows.append(([bos] if prepend_bos else []) + buffer[:body])
                del buffer[:body]
            if len(windows) >= n_seq:
                break
    if len(windows) < n_seq and batch:
        flush(batch)
    while len(buffer) >= body and len(windows) < n_seq:
        windows.append(([bos] if prepend_bos else []) + buffer[:body])
        del buffer[:body]
    if not windows:
        raise ValueError(f"the corpus gave fewer than {body} tokens: cannot fill one window of {ctx_len}")
    if len(windows) < n_seq:
        import logging

        logging.getLogger(__name__).warning(
            "corpus ran out: %d windows (%d tokens) instead of %d", len(windows), len(windows) * ctx_len, n_seq
        )
    return torch.tensor(windows, dtype=torch.int32)
