"""Batched greedy generation (left padding) of short texts, for the fluency metric.

ROME samples with top-k=5 for its fluency texts; greedy decoding is used here so that a checkpoint's
fluency does not move with sampling noise between evaluations. Pass the texts to
``metrics.n_gram_entropy``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .scoring import _eval_mode, _model_device
from .tokenization import encode, pad_id

__all__ = ["generate_texts"]


def generate_texts(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 100,
    batch_size: int = 16,
    *,
    return_full_text: bool = True,
) -> list[str]:
    """Greedy continuation of each prompt, generated ``batch_size`` prompts at a time.

    Returns prompt + continuation (ROME computes n-gram entropy on the full text) or, with
    ``return_full_text=False``, just the continuation. Generation stops at EOS or ``max_new_tokens``.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
    fill = pad_id(tok)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tok, "eos_token_id", None)
    # A fresh config: the model's own may carry sampling settings (temperature, top_p) we do not want.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=fill, eos_token_id=eos
    )
    device = _model_device(model)
    encoded = [list(encode(tok, p)) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) encodes to no tokens; generation needs at least one")
    out: list[str] = []
    with _eval_mode(model), torch.inference_mode():
        for b0 in range(0, len(encoded), batch_size):
            batch = encoded[b0:b0 + batch_size]
            width = max(len(s) for s in batch)
            # Left padding: every row's last real token sits at the same column, where generation appends.
            input_ids = torch.full((len(batch), width), fill, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, s in enumerate(batch):
                input_ids[r, width - len(s):] = torch.tensor(s)
                mask[r, width - len(s):] = 1
            gen = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for r, s in enumerate(batch):
                new = gen[r, width:].tolist()
                if eos is not None:
                    stops = eos if isinstance(eos, (list, tuple)) else [eos]
                    cut = next((j for j, t in enumerate(new) if t in stops), len(new))
                    new = new[:cut]
                prompt = prompts[b0 + r]
                # Decode with the prompt tokens in front so SentencePiece keeps the leading space of the
                # first new word; the continuation is what the full decode adds after the prompt decode.
                head = tok.decode(s, skip_special_tokens=True)
                full = tok.decode(s + new, skip_special_tokens=True)
                cont = full[len(head):] if full.startswith(head) else tok.decode(new, skip_special_tokens=True)
                out.append(prompt + cont if return_full_text else cont)
    return out
