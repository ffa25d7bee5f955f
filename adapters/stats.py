"""Second-moment statistics E[k kᵀ] of edited modules' inputs from a local text corpus, cached.

MEMIT and ROME weight their updates by these statistics; easyeditor computes them from Wikipedia through
the hub. Here they come from a local corpus (a file, or the shipped ME-PPL sentences), for all layers of
one hparams file in a single forward pass per batch, cached as safetensors keyed by model, corpus
fingerprint, layer, dtype and sample count.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from .models import cache_dir, save_cache_file

SHIPPED_CORPORA = {"me-ppl": Path(__file__).parent / "data" / "ME-PPL_1k.json"}
HUB_DATASETS = ("wikipedia", "wikitext")


@dataclass(frozen=True)
class Corpus:
    """Texts for the statistics, with a name and a content fingerprint (part of the cache key)."""

    name: str
    texts: tuple[str, ...]
    fingerprint: str


def is_local_corpus(spec: str) -> bool:
    """Whether ``spec`` names a shipped corpus or an existing file (else: a hub dataset name)."""
    return spec.lower() in SHIPPED_CORPORA or Path(spec).expanduser().is_file()


def load_corpus(spec: Union[str, Path]) -> Corpus:
    """A corpus from a shipped name (``me-ppl``) or a file: .txt (one text a line), .json (list of strings or
    of records with ``Text``/``text``), .jsonl; ``.gz`` allowed."""
    spec_s = str(spec)
    path = SHIPPED_CORPORA.get(spec_s.lower(), Path(spec_s).expanduser())
    if not path.is_file():
        raise FileNotFoundError(
            f"statistics corpus {spec_s!r} is neither a shipped corpus {sorted(SHIPPED_CORPORA)} nor a file; "
            "set mom2_dataset in the hparams to one of those or to a text/JSON file path"
        )
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    stem = path.name.removesuffix(".gz")
    if stem.endswith(".txt"):
        items: list = [line for line in text.splitlines() if line.strip()]
    elif stem.endswith(".jsonl"):
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(items, list):
            raise ValueError(f"{path}: expected a JSON list of texts or records, got {type(items).__name__}")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            item = item.get("Text", item.get("text"))
        if not isinstance(item, str):
            raise ValueError(f"{path}: record {i} has no text (expected a string or a record with 'Text'/'text')")
        if item.strip():
            texts.append(item.strip())
    if not texts:
        raise ValueError(f"{path}: no texts found")
    name = spec_s.lower() if spec_s.lower() in SHIPPED_CORPORA else stem.rsplit(".", 1)[0]
    return Corpus(name=name, texts=tuple(texts), fingerprint=hashlib.sha256(raw).hexdigest()[:12])


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def statistics_model_id(model: torch.nn.Module) -> str:
    """The name easyeditor files a model's covariance statistics under (``COV_CACHE``/``inv_mom2_cache`` keys
    are (this, layer name)): its ``_name_or_path`` with ``/`` replaced by ``_``."""
    return model.config._name_or_path.replace("/", "_")


def stats_path(model_id: str, corpus: Corpus, layer_name: str, dtype: str, n_samples: int) -> Path:
    """Cache file of one layer's statistics."""
    return (cache_dir() / "stats" / _safe(model_id) / f"{_safe(corpus.name)}-{corpus.fingerprint}"
            / f"{layer_name}_{dtype}_mom2_{n_samples}.safetensors")


def second_moments(
    model: torch.nn.Module,
    tok,
    layer_names: Sequence[str],
    corpus: Corpus,
    n_samples: int,
    dtype: str = "float32",
    model_id: Optional[str] = None,
    batch_size: int = 32,
    max_length: int = 256,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """E[k kᵀ] of each named module's input over the first ``n_samples`` texts of ``corpus``.

    Loads what is cached; computes the missing layers together, one forward pass per batch.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    model_id = model_id or model.config._name_or_path
    out: dict[str, torch.Tensor] = {}
    missing = []
    from safetensors.torch import load_file

    for name in layer_names:
        path = stats_path(model_id, corpus, name, dtype, n_samples)
        if path.exists():
            out[name] = load_file(str(path))["mom2"]
        else:
            missing.append(name)
    if not missing:
        return out
    texts = list(corpus.texts[:n_samples])
    if len(texts) < n_samples:
        print(f"[revive] corpus {corpus.name} has {len(texts)} texts (< {n_samples} asked); using all of them")
    acc_dtype = getattr(torch, dtype)
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    count = 0
    current_mask: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, inputs):
            x = inputs[0]
            feats = x[current_mask["m"]].to(acc_dtype)  # only real (non-pad) tokens
            s = feats.T @ feats
            sums[name] = s if name not in sums else sums[name] + s
        return hook

    handles = []
    for name in missing:
        if name not in modules:
            raise ValueError(f"module {name!r} not found in the model (check rewrite_module_tmp and layers)")
        handles.append(modules[name].register_forward_pre_hook(hook_for(name)))
    padding_side = tok.padding_side
    try:
        tok.padding_side = "right"
        with torch.inference_mode():
            bar = tqdm(range(0, len(texts), batch_size), desc=f"second moments ({len(missing)} layers)",
                       disable=not progress, unit="batch")
            for i in bar:
                batch = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(device)
                current_mask["m"] = batch["attention_mask"].bool()
                count += int(current_mask["m"].sum())
                model(**batch)
    finally:
        tok.padding_side = padding_side
        for h in handles:
            h.remove()
    for name in missing:
        mom2 = (sums[name] / count).cpu().contiguous()
        save_cache_file({"mom2": mom2}, stats_path(model_id, corpus, name, dtype, n_samples),
                        metadata={"count": str(count), "corpus": corpus.name, "fingerprint": corpus.fingerprint})
        out[name] = mom2
    return out
