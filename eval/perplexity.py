"""Token-weighted perplexity of a fixed sentence set: the collapse measure of sequential editing.

"The Butterfly Effect of Model Editing" (Yang et al., ACL Findings 2024) and "Rebuilding ROME" (Gupta et
al., 2024) detect a collapsed model by the perplexity of ordinary text (their ME-PPL sentences): a few bad
edits multiply it. The measure here is

    ppl = exp( Σ_sentences Σ_{t ≥ 1} −log p(x_t | x_<t)  /  Σ_sentences (len − 1) )

over token ids with the tokenizer's own special tokens (the first token is context only: without a BOS
nothing predicts it), each sentence cut to ``max_tokens``. Sentences run length-sorted and right-padded,
``batch_size`` at a time (the logits of a batch are batch × length × vocabulary floats).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .tokenization import encode, pad_id

__all__ = ["DEFAULT_PPL_DATA", "load_sentences", "perplexity"]

#: 200 ME-PPL sentences outside the MEMIT statistics corpus (see eval/data/PROVENANCE.md).
DEFAULT_PPL_DATA = Path(__file__).resolve().parent / "data" / "ppl" / "me_ppl_200.json"


def load_sentences(path: Optional[str | Path] = None, limit: Optional[int] = None) -> list[str]:
    """Texts of a ME-PPL-style file (a JSON list of ``{"Text": ...}`` records or of strings)."""
    p = Path(path) if path else DEFAULT_PPL_DATA
    if not p.exists():
        raise FileNotFoundError(f"perplexity data {p} not found (default: the shipped {DEFAULT_PPL_DATA.name})")
    try:
        records = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"perplexity data {p} is not valid JSON ({e}); expected a list of {{\"Text\": ...}}") from e
    texts = [r["Text"] if isinstance(r, dict) else r for r in records]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"perplexity data {p}: expected a non-empty list of texts or {{\"Text\": str}} records")
    return texts[:limit] if limit else texts


def perplexity(model: torch.nn.Module, tok: Any, texts: Sequence[str], batch_size: int = 8,
               max_tokens: int = 128, progress: Optional[str] = None) -> dict[str, float]:
    """``{"ppl": token-weighted perplexity, "ppl_nll": mean token NLL, "ppl_tokens": tokens scored}``."""
    seqs = [list(encode(tok, t))[:max_tokens] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        raise ValueError("no text has two or more tokens: nothing to score")
    fill = pad_id(tok)
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b0 in tqdm(range(0, len(order), batch_size), desc=progress, unit="batch", leave=False,
                           disable=progress is None):
                batch = [seqs[i] for i in order[b0:b0 + batch_size]]
                width = max(len(s) for s in batch)
                ids = torch.full((len(batch), width), fill, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, s in enumerate(batch):
                    ids[r, :len(s)] = torch.tensor(s)
                    mask[r, :len(s)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                # Positions that predict a real next token, and those tokens.
                rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)
                targets = ids[rows, cols + 1].to(device)
                picked = logits[rows.to(device), cols.to(device)].float()
                total_nll += float(torch.nn.functional.cross_entropy(picked, targets, reduction="sum"))
                total_tokens += len(targets)
    finally:
        model.train(was_training)
    nll = total_nll / total_tokens
    return {"ppl": math.exp(nll), "ppl_nll": nll, "ppl_tokens": total_tokens}
