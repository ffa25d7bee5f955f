"""Batched teacher-forced log-probability scoring of (prompt, continuation) pairs under a causal LM.

Every pair becomes one sequence ``prompt + continuation`` — except a one-token continuation, read off
its prompt's own forward pass, which is shared by all the targets scored after the same prompt (CounterFact
scores every prompt against the new and the true object). Identical sequences run once. Sequences are
length-sorted, padded on the tokenizer's side with an attention mask and explicit position ids (so left padding gives the same
numbers as no padding), and run through the model ``batch_size`` at a time under
``torch.inference_mode()``. Only the continuation positions are turned into log-probabilities.
"""
from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .tokenization import encode, pad_id, special_affixes

__all__ = ["TokenScores", "join_continuation", "score_continuations", "tokenize_pair"]


@dataclass(frozen=True)
class TokenScores:
    """Scores of one continuation given its prompt."""

    sum_logprob: float
    mean_logprob: float            # sum_logprob / n_tokens
    n_tokens: int
    correct: tuple[bool, ...]      # per token: argmax of the model == the continuation token
    target_ids: tuple[int, ...]    # the continuation's token ids
    argmax_ids: tuple[int, ...]    # the model's top-1 token at each continuation position
    token_logprobs: tuple[float, ...]

    @property
    def mean_nll(self) -> float:
        """Mean per-token negative log-likelihood (ROME's ``test_batch_prediction`` quantity)."""
        return -self.mean_logprob

    @property
    def prob(self) -> float:
        """exp(-mean NLL): the per-token geometric-mean probability ROME/MEMIT compare."""
        return math.exp(self.mean_logprob)

    @property
    def accuracy(self) -> float:
        """Fraction of continuation tokens predicted top-1 under teacher forcing."""
        return sum(self.correct) / self.n_tokens


def join_continuation(prompt: str, continuation: str) -> str:
    """``prompt + continuation`` with the CounterFact/zsRE space convention.

    A space is put in front of the continuation unless it already starts with whitespace or the prompt
    is empty or already ends with whitespace (which would give a double space).
    """
    if continuation[:1].isspace() or not prompt or prompt[-1:].isspace():
        return prompt + continuation
    return f"{prompt} {continuation}"


def tokenize_pair(tok: Any, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Ids of the joined text (incl. BOS, without trailing EOS) and the index of the first continuation token.

    The continuation is tokenized as part of the full text, so BPE/SentencePiece merges and the leading
    space come out exactly as the model sees them. The boundary is the longest common prefix with the
    prompt's own encoding; if the tokenizer merges across the boundary, the merged token counts as
    continuation.
    """
    full, start, _ = _encode_pair(tok, prompt, continuation)
    return full, start


def _encode_pair(tok: Any, prompt: str, continuation: str) -> tuple[list[int], int, bool]:
    """``tokenize_pair`` plus whether the prompt alone encodes to exactly ``full[:start]`` (a clean boundary)."""
    if not continuation:
        raise ValueError(f"empty continuation for prompt {prompt!r}")
    _, n_suffix = special_affixes(tok)
    full = list(encode(tok, join_continuation(prompt, continuation)))
    prompt_ids = list(encode(tok, prompt))
    if n_suffix:  # a trailing EOS would otherwise be scored as part of the continuation
        full, prompt_ids = full[:-n_suffix], prompt_ids[:-n_suffix]
    start = 0
    for a, b in zip(prompt_ids, full):
        if a != b:
            break
        start += 1
    if start >= len(full):
        raise ValueError(f"continuation {continuation!r} produced no tokens after prompt {prompt!r}")
    if start == 0:
        raise ValueError(
            f"cannot score the first token of {continuation!r}: the prompt {prompt!r} is empty and the "
            "tokenizer adds no BOS token, so no position predicts it"
        )
    return full, start, start == len(prompt_ids)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while scoring, the caller's train/eval mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _forward_params(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def score_continuations(
    model: torch.nn.Module,
    tok: Any,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 32,
    *,
    padding_side: str | None = None,
    progress: str | None = None,
) -> list[TokenScores]:
    """Score ``continuations[i]`` after ``prompts[i]`` for every i, in batches; results keep input order.

    ``padding_side`` defaults to ``tok.padding_side``; both sides give the same scores because position
    ids are derived from the attention mask. The tokenizer itself is not modified. ``progress``: a label
    for a progress bar over the batches (None: no bar).
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    side = padding_side or getattr(tok, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

    pairs = [_encode_pair(tok, p, c) for p, c in zip(prompts, continuations)]
    encoded = [(ids, start) for ids, start, _ in pairs]
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions:
        for i, (ids, _) in enumerate(encoded):
            if len(ids) > max_positions:
                raise ValueError(f"pair {i}: {len(ids)} tokens exceed the model's {max_positions} positions")

    # What to run: one sequence per distinct token list, each with the (pair, position, target) picks read
    # from its logits. A one-token continuation whose prompt tokenizes the same alone is read off the prompt's
    # own forward pass (the logits at its last position are the same in the joined sequence: causal model),
    # so a prompt scored against several one-token targets (new and true object) runs once.
    seq_index: dict[tuple[int, ...], int] = {}
    sequences: list[list[int]] = []
    picks: list[list[tuple[int, int, int]]] = []   # per sequence: (pair, position, target id)
    for i, (ids, start, clean) in enumerate(pairs):
        seq = ids[:start] if clean and len(ids) - start == 1 else ids
        key = tuple(seq)
        if key not in seq_index:
            seq_index[key] = len(sequences)
            sequences.append(list(seq))
            picks.append([])
        picks[seq_index[key]] += [(i, start - 1 + j, ids[start + j]) for j in range(len(ids) - start)]

    params = _forward_params(model)
    device = _model_device(model)
    fill = pad_id(tok)
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows up at once.
    order = sorted(range(len(sequences)), key=lambda q: -len(sequences[q]))
    per_pair: list[list[tuple[int, float, int, int]]] = [[] for _ in encoded]  # (position, logprob, argmax, target)

    with _eval_mode(model), torch.inference_mode():
        batches = range(0, len(order), batch_size)
        for b0 in tqdm(batches, desc=progress, unit="batch", disable=progress is None, leave=False):
            idx = order[b0:b0 + batch_size]
            seqs = [sequences[q] for q in idx]
            width = max(len(x) for x in seqs)
            input_ids = torch.full((len(idx), width), fill, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            offsets = []
            for r, x in enumerate(seqs):
                off = width - len(x) if side == "left" else 0
                input_ids[r, off:off + len(x)] = torch.tensor(x)
                mask[r, off:off + len(x)] = 1
                offsets.append(off)

            kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
            if "position_ids" in params:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
            if "use_cache" in params:
                kwargs["use_cache"] = False
            # Logits only from the first position that predicts a continuation token: the LM head over
            # the whole padded batch would dominate memory (vocab x seq x batch).
            first_needed = min(offsets[r] + min(p for _, p, _ in picks[q]) for r, q in enumerate(idx))
            if "logits_to_keep" in params:
                kwargs["logits_to_keep"] = width - first_needed
            out = model(**kwargs)
            logits = out.logits if hasattr(out, "logits") else out[0]
            # Trust the returned shape, not the request: a wrapper may ignore logits_to_keep.
            shift = width - logits.shape[1]

            rows, pos, tgt, owners = [], [], [], []
            for r, q in enumerate(idx):
                for pair, position, target in picks[q]:
                    rows.append(r)
                    pos.append(offsets[r] + position - shift)
                    tgt.append(target)
                    owners.append((pair, position))
            picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(pos, device=logits.device)]
            logp = torch.log_softmax(picked.float(), dim=-1)
            target = torch.tensor(tgt, device=logits.device)
            tok_lp = logp.gather(1, target[:, None])[:, 0].cpu().tolist()
            argmax = picked.argmax(-1).cpu().tolist()
            for (pair, position), lp, am, tg in zip(owners, tok_lp, argmax, tgt):
                per_pair[pair].append((position, lp, am, tg))

    results: list[TokenScores] = []
    for tokens in per_pair:
        tokens.sort()
        lps = tuple(t[1] for t in tokens)
        am = tuple(t[2] for t in tokens)
        tg = tuple(t[3] for t in tokens)
        total = float(sum(lps))
        results.append(TokenScores(
            sum_logprob=total,
            mean_logprob=total / len(tokens),
            n_tokens=len(tokens),
            correct=tuple(a == t for a, t in zip(am, tg)),
            target_ids=tg,
            argmax_ids=am,
            token_logprobs=lps,
        ))
    return results
