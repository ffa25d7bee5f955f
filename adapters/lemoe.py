"""LEMoE (Wang & Li, 2024, arXiv:2406.20030): a mixture-of-experts adaptor in one FFN layer, one new expert per
editing batch, earlier experts frozen, routing by KV anchors. An easyeditor-style editor: ``LEMoEHyperParams``
(``from_hparams``) and ``apply_lemoe_to_model``, which ``enable_easyedit()`` registers in ALG_DICT as "LEMoE".

What follows is our implementation written from the public descriptions of the method (the abstract and the
architecture figure's caption: "when editing data_i, the prior experts corresponding to previous data are all
frozen, leaving only the new module FFN_i and router trainable"); the authors' code was not available. Where
the paper's exact form was not available to us, the choice made here is stated.

The adaptor (the MoE form of MEMoE, the same authors' batch editor, arXiv:2405.19086):

    h(x) = FFN_L(x) + λ Σ_e G_e(x) E_e(x)                                                         (1)

at the FFN of layer L (``mlp_module_tmp.format(layers[0])``), x its input at one token position. Choices:

* expert E_e: a small FFN of width r (``expert_rank``) added to the FFN output,
  ``E_e(x) = V_e silu(U_e x)`` with U_e ∈ R^{r×d}, V_e ∈ R^{d×r}; V_e starts at zero, so a new expert changes
  nothing until it is trained (not a copy of FFN_L: 1,000 copies of a 2.6M-parameter FFN would not fit);
* gate G: top-1 and hard (G_e ∈ {0, 1}) — no learned router. The router *is* the KV anchor table: each edited
  fact writes one anchor, key k_a = the FFN input x at the last token of its subject in its edit prompt
  (normalised), value = the expert e(a) trained on that fact's batch. A token routes to the expert of its
  nearest anchor if the cosine is above a threshold θ (``route_threshold``), else to no expert:

      a*(x) = argmax_{a : cos(x, k_a) ≥ θ_a} cos(x, k_a),   G_e(x) = 1[a*(x) exists and e = e(a*(x))]    (2)

  (ties go to the newest anchor, so a fact edited again is answered by its latest expert). The threshold of an
  anchor is θ_a = max(θ, max_{t ∈ R} cos(t, k_a) + m) when a reference corpus R of ordinary text is set
  (``reference_corpus``, its first ``reference_samples`` texts, margin m = ``route_margin`` > 0), else θ:
  no token of R routes anywhere. Our choice, made after calibration on SmolLM2: some subjects' last tokens
  have generic FFN inputs (low norm, near the direction that position 0 and tokens like " the" share), so
  with one global θ = 0.7 about 8% of ordinary-text tokens routed to some expert and the perplexity of
  ordinary text rose ×1.7 after one batch; centring the keys on the corpus mean did not separate them
  (docs/calibration/README.md, "LEMoE"). Since x is the
  FFN's *input* and every expert adds to its *output*, no expert changes any query or anchor: the route of a
  token is the same when its expert is trained, after later experts are added and at inference (the
  consistency between training and inference that the paper's KV anchor routing is designed for), and an
  input with no token above θ gets exactly the unedited model's output. Routing is per token and stateless,
  so generation with a KV cache routes as a full forward pass does; the edit reaches the prediction the way
  ROME's does, through attention from the subject's last token, so L is a layer of the subject-enrichment
  range (SmolLM2: MEMIT's layers 4–8; layer 6 here, see hparams/LEMoE/smollm2-135m.yaml);
* module insertion: each call of ``apply_lemoe_to_model`` (one editing batch) adds one expert and one anchor
  per request, trains only that expert (Adam on the new target's NLL given the prompt, with every model
  weight and every earlier expert frozen; the anchors are fixed keys, nothing of the router is trained),
  then freezes it:

      min_{U_i, V_i}  −(1/|B_i|) Σ_{(p, o*) ∈ B_i} (1/|o*|) log P_{h with experts 1..i}(o* | p)          (3)

  An interrupted call leaves the adaptor as it was (the new expert and anchors are removed);
* clustering-based editing order planning (the paper orders the edit stream by clustering it before
  editing) is not done: the harness's lifelong setting edits the stream in its given order (its first N
  records are the N edits made), so reordering would change which facts a checkpoint has edited. Omitted.

The experts and anchors are the editor's state (``lemoe_state`` / ``restore_lemoe_state``): the harness
checkpoints them in ``editor.safetensors`` and re-inserts the adaptor into a freshly loaded model on resume.
The plugin host passes LEMoE through (adapters/editors.py: it adds modules): no pre-existing weight changes,
so REVIVE and the other delta filters have nothing to filter.
"""
from __future__ import annotations

import copy as copy_module
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from revive_plugin import yamlio

__all__ = ["ALG_NAME", "LEMoEAdaptor", "LEMoEHyperParams", "adaptor_of", "anchor_floors", "apply_lemoe_to_model",
           "attach_adaptor", "detach_adaptor", "lemoe_state", "reference_inputs", "restore_lemoe_state", "route", "token_inputs"]

logger = logging.getLogger(__name__)

ALG_NAME = "LEMoE"
#: Name of the adaptor submodule on the wrapped FFN (its parameters are ``<ffn>.lemoe.experts.<i>.{U,V}``).
ATTR = "lemoe"
#: Keys of the editor state (checkpoint tensors).
STATE_KEYS = ("lemoe.layer", "lemoe.anchors", "lemoe.owners", "lemoe.U", "lemoe.V")
#: Optional state keys (a state written before they existed loads without them).
OPTIONAL_STATE_KEYS = ("lemoe.floors",)
#: The floor of an anchor without a reference corpus: below every cosine, so θ alone decides.
NO_FLOOR = -1.0


@dataclass
class LEMoEHyperParams:
    """LEMoE settings (YAML: hparams/LEMoE/*.yaml). easyeditor's BaseEditor reads ``model_name``, ``device``,
    ``model_parallel`` and ``batch_size``; the harness watches ``rewrite_module_tmp`` × ``layers`` (the FFN
    weight it checkpoints and monitors), which LEMoE never writes."""

    alg_name: str
    model_name: str
    layers: list                                      # [L]: the one FFN layer that gets the adaptor
    mlp_module_tmp: str = "model.layers.{}.mlp"       # the FFN wrapped (its input is routed, its output added to)
    rewrite_module_tmp: str = "model.layers.{}.mlp.down_proj"  # watched by the harness; LEMoE leaves it as it is
    expert_rank: int = 32                             # r: width of each expert's hidden layer
    route_threshold: float = 0.7                      # θ: cosine to an anchor needed to route to its expert
    reference_corpus: Optional[str] = None            # R: ordinary text no token of which may route (None: θ only)
    reference_samples: int = 300                      # texts of R used
    route_margin: float = 0.02                        # m: an anchor's threshold is ≥ R's highest cosine with it + m
    scale: float = 1.0                                # λ in (1)
    num_steps: int = 40                               # Adam steps per editing batch (at most)
    lr: float = 1e-2
    weight_decay: float = 0.0
    stop_loss: float = 0.05                           # stop a batch's training once its mean target NLL is below
    seed: int = 0                                     # expert i starts from a generator seeded with seed + i
    device: Any = 0                                   # easyeditor's cuda:{device}; redirected to CPU without a GPU
    model_parallel: bool = False
    batch_size: int = 1                               # easyeditor's BaseEditor sets it; one call = one expert
    max_length: int = 40

    def __post_init__(self) -> None:
        if self.alg_name != ALG_NAME:
            raise ValueError(f"LEMoEHyperParams: alg_name must be {ALG_NAME!r}, got {self.alg_name!r}")
        if not (isinstance(self.layers, (list, tuple)) and len(self.layers) == 1 and isinstance(self.layers[0], int)
                and not isinstance(self.layers[0], bool)):
            raise ValueError(f"LEMoE: layers must name exactly one FFN layer, e.g. [6]; got {self.layers!r}")
        for key in ("expert_rank", "num_steps", "reference_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LEMoE: {key} must be a positive integer, got {value!r}")
        for key in ("route_threshold", "scale", "lr", "weight_decay", "stop_loss", "route_margin"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"LEMoE: {key} must be a number, got {value!r}")
            setattr(self, key, float(value))
        if not -1.0 < self.route_threshold <= 1.0:
            raise ValueError(f"LEMoE: route_threshold is a cosine in (-1, 1], got {self.route_threshold}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"LEMoE: lr must be > 0 and weight_decay ≥ 0, got {self.lr}, {self.weight_decay}")
        if self.route_margin < 0:
            raise ValueError(f"LEMoE: route_margin must be ≥ 0, got {self.route_margin}")
        if self.reference_corpus is not None and not (isinstance(self.reference_corpus, str) and self.reference_corpus):
            raise ValueError(f"LEMoE: reference_corpus names a corpus (me-ppl or a text/JSON file path) or is null, "
                             f"got {self.reference_corpus!r}")

    @classmethod
    def from_hparams(cls, hparams_name_or_path: str) -> "LEMoEHyperParams":
        path = hparams_name_or_path if ".yaml" in hparams_name_or_path else hparams_name_or_path + ".yaml"
        with open(path, encoding="utf-8") as fh:
            config = yamlio.load(fh)
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a mapping of LEMoE settings")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - fields)
        if unknown:
            raise ValueError(f"{path}: unknown LEMoE setting(s) {unknown}; settings: {sorted(fields)}")
        for key, value in config.items():  # YAML reads 1e-2 as a string (like easyeditor's loader, convert it)
            if isinstance(value, str) and key not in ("alg_name", "model_name", "mlp_module_tmp", "rewrite_module_tmp",
                                                      "reference_corpus"):
                try:
                    config[key] = float(value)
                except ValueError:
                    pass
        return cls(**config)

    @property
    def ffn_name(self) -> str:
        return self.mlp_module_tmp.format(self.layers[0])


class LEMoEExpert(nn.Module):
    """E(x) = V silu(U x): one editing batch's expert."""

    def __init__(self, hidden: int, rank: int, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        super().__init__()
        u = torch.randn(rank, hidden, generator=generator, dtype=torch.float32) / hidden ** 0.5
        self.U = nn.Parameter(u.to(dtype=dtype, device=device))
        self.V = nn.Parameter(torch.zeros(hidden, rank, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.U)), self.V)


def route(x: torch.Tensor, anchors: torch.Tensor, owners: torch.Tensor, threshold: float,
          floors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Equation (2): the expert each row of ``x`` (…, d) is routed to, or −1 for none.

    ``anchors`` (A, d) are unit-norm keys, ``owners`` (A,) their experts, ``floors`` (A,) the reference-corpus
    part of their thresholds (θ_a = max(``threshold``, floor_a); None: θ for all). Among the anchors whose
    cosine reaches their threshold the nearest decides, ties going to the newest (highest index).
    """
    if anchors.shape[0] == 0:
        return torch.full(x.shape[:-1], -1, dtype=torch.long, device=x.device)
    scores = F.normalize(x.detach().float(), dim=-1) @ anchors.float().T
    thresholds = torch.full((anchors.shape[0],), float(threshold), device=scores.device)
    if floors is not None:
        thresholds = torch.maximum(thresholds, floors.to(scores.device, torch.float32))
    scores = scores.masked_fill(scores < thresholds, float("-inf"))
    best, reversed_index = scores.flip(-1).max(-1)  # max returns the first maximum: the newest after the flip
    nearest = anchors.shape[0] - 1 - reversed_index
    return torch.where(best > float("-inf"), owners[nearest], torch.full_like(nearest, -1))


class LEMoEAdaptor(nn.Module):
    """The experts and KV anchors of one FFN; a forward hook on the FFN adds equation (1)'s sum to its output."""

    def __init__(self, hidden: int, rank: int, threshold: float, scale: float) -> None:
        super().__init__()
        self.hidden, self.rank, self.threshold, self.scale = hidden, rank, float(threshold), float(scale)
        self.experts = nn.ModuleList()
        self.register_buffer("anchors", torch.zeros(0, hidden))
        self.register_buffer("owners", torch.zeros(0, dtype=torch.long))
        self.register_buffer("floors", torch.zeros(0))  # reference-corpus floor of each anchor's threshold
        self.reference: Optional[tuple[tuple, torch.Tensor]] = None  # (key, unit FFN inputs of R): computed once

    def routes(self, x: torch.Tensor) -> torch.Tensor:
        """The expert of each token of ``x`` (the FFN's input), −1 for none."""
        return route(x, self.anchors, self.owners, self.threshold, self.floors)

    def delta(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """λ Σ_e G_e(x) E_e(x) for the FFN input ``x``, or None when no token is routed."""
        if self.anchors.shape[0] == 0:
            return None
        experts = self.routes(x)
        chosen = [int(e) for e in torch.unique(experts) if e >= 0]
        if not chosen:
            return None
        out = torch.zeros_like(x)
        for e in chosen:
            mask = experts == e
            out[mask] = self.scale * self.experts[e](x[mask])
        return out

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        added = self.delta(args[0])
        return output if added is None else output + added.to(output.dtype)

    def add(self, keys: torch.Tensor, expert: LEMoEExpert, floors: Optional[torch.Tensor] = None) -> None:
        """Append an expert and its anchors (unnormalised keys, one per fact; ``floors``: see ``anchor_floors``)."""
        self.experts.append(expert)
        index = len(self.experts) - 1
        anchors = F.normalize(keys.detach().to(self.anchors.device, torch.float32), dim=-1)
        if floors is None:
            floors = torch.full((len(anchors),), NO_FLOOR)
        self.anchors = torch.cat([self.anchors, anchors])
        self.owners = torch.cat([self.owners, torch.full((len(anchors),), index, dtype=torch.long,
                                                         device=self.owners.device)])
        self.floors = torch.cat([self.floors, floors.to(self.floors.device, torch.float32)])

    def drop_last(self, n_anchors: int) -> None:
        """Undo the last ``add`` (an interrupted or failed editing batch)."""
        del self.experts[len(self.experts) - 1]
        keep = self.anchors.shape[0] - n_anchors
        self.anchors, self.owners, self.floors = (t[:keep].clone() for t in (self.anchors, self.owners, self.floors))


# -- the adaptor in a model ----------------------------------------------------------------------------
def adaptor_of(model: nn.Module) -> Optional[tuple[str, LEMoEAdaptor]]:
    """(FFN name, adaptor) of the LEMoE adaptor inserted in ``model``, or None."""
    for name, module in model.named_modules():
        if isinstance(module, LEMoEAdaptor):
            return name.rpartition(".")[0], module
    return None


def detach_adaptor(model: nn.Module) -> None:
    """Remove the LEMoE adaptor (its hook and its submodule) from ``model``, if it has one."""
    found = adaptor_of(model)
    if found is None:
        return
    ffn = model.get_submodule(found[0])
    for key, hook in list(ffn._forward_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), LEMoEAdaptor):
            del ffn._forward_hooks[key]
    delattr(ffn, ATTR)


def attach_adaptor(model: nn.Module, hparams: LEMoEHyperParams) -> LEMoEAdaptor:
    """The adaptor on the FFN ``hparams`` names, inserted (empty) if the model has none; an adaptor on another
    FFN is an error."""
    found = adaptor_of(model)
    if found is not None:
        name, adaptor = found
        if name != hparams.ffn_name:
            raise ValueError(f"LEMoE: the model's adaptor is on {name}, these hparams put it on {hparams.ffn_name}")
        adaptor.threshold, adaptor.scale = hparams.route_threshold, hparams.scale
        if adaptor.rank != hparams.expert_rank:
            raise ValueError(f"LEMoE: the model's experts have rank {adaptor.rank}, the hparams ask for "
                             f"{hparams.expert_rank}")
        return adaptor
    ffn = model.get_submodule(hparams.ffn_name)
    weight = next(ffn.parameters())
    hidden = int(getattr(model.config, "hidden_size", 0) or ffn_input_size(ffn))
    adaptor = LEMoEAdaptor(hidden, hparams.expert_rank, hparams.route_threshold, hparams.scale).to(weight.device)
    setattr(ffn, ATTR, adaptor)
    ffn.register_forward_hook(adaptor._hook)
    return adaptor


def ffn_input_size(ffn: nn.Module) -> int:
    """d of an FFN without a model config: its first linear layer's input size."""
    for module in ffn.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
    raise ValueError(f"LEMoE: cannot tell the input size of {type(ffn).__name__}")


# -- editing -------------------------------------------------------------------------------------------
def _full_prompt(request: Mapping[str, Any]) -> str:
    prompt, subject = request["prompt"], request.get("subject") or ""
    return prompt.replace("{}", subject) if "{}" in prompt else prompt


def _subject_last_index(tok: Any, prompt: str, subject: str, ids: Sequence[int]) -> int:
    """Index in ``ids`` (the prompt's tokens) of the last token of the last occurrence of ``subject``; the last
    token when the subject is not in the prompt."""
    at = prompt.rfind(subject) if subject else -1
    if at < 0:
        return len(ids) - 1
    end = at + len(subject)
    if getattr(tok, "is_fast", False):
        offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
        inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end]
        if inside and len(offsets) == len(ids):
            return inside[-1]
    from revive_plugin.eval.tokenization import encode, special_affixes

    n_suffix = special_affixes(tok)[1]
    prefix = list(encode(tok, prompt[:end]))
    return min(len(prefix) - n_suffix, len(ids)) - 1


def _pad(rows: Sequence[Sequence[int]], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (positions of real tokens are then 0..n−1 in every row)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tok, attr, None)
        if isinstance(value, int):
            return value
    return 0


def request_keys(model: nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]],
                 hparams: LEMoEHyperParams) -> torch.Tensor:
    """The anchors' keys: the FFN input at each request's subject-last token in its prompt, (n, d)."""
    from revive_plugin.eval.tokenization import encode, special_affixes

    n_suffix = special_affixes(tok)[1]
    prompts = [_full_prompt(r) for r in requests]
    rows = []
    for p in prompts:
        ids = list(encode(tok, p))
        rows.append(ids[: len(ids) - n_suffix] if n_suffix else ids)
    where = [_subject_last_index(tok, p, r.get("subject") or "", ids) for p, r, ids in zip(prompts, requests, rows)]
    device = next(model.parameters()).device
    ids, mask = _pad(rows, _pad_id(tok), device)
    captured: list[torch.Tensor] = []
    ffn = model.get_submodule(hparams.ffn_name)
    handle = ffn.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    x = captured[0]
    return torch.stack([x[i, j] for i, j in enumerate(where)]).float()


def reference_inputs(model: nn.Module, tok: Any, hparams: LEMoEHyperParams, adaptor: LEMoEAdaptor) -> torch.Tensor:
    """Unit-norm FFN inputs of every token of the reference corpus R, (T, d); computed once per adaptor (the
    experts add to the FFN's output, so they never change its input)."""
    from .stats import load_corpus

    corpus = load_corpus(str(hparams.reference_corpus))
    key = (corpus.fingerprint, hparams.reference_samples, hparams.ffn_name)
    if adaptor.reference is None or adaptor.reference[0] != key:
        texts = list(corpus.texts[: hparams.reference_samples])
        adaptor.reference = (key, token_inputs(model, tok, hparams.ffn_name, texts))
    return adaptor.reference[1]


def token_inputs(model: nn.Module, tok: Any, ffn_name: str, texts: Sequence[str], batch_size: int = 16,
                 max_length: int = 128, unit: bool = True) -> torch.Tensor:
    """Inputs of the FFN ``ffn_name`` at every real token of ``texts`` (each cut to ``max_length`` tokens), (T, d);
    unit-norm unless ``unit`` is false."""
    from revive_plugin.eval.tokenization import encode

    ffn = model.get_submodule(ffn_name)
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = ffn.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    rows = []
    try:
        for i in range(0, len(texts), batch_size):
            ids, mask = _pad([list(encode(tok, t))[:max_length] for t in texts[i: i + batch_size]], _pad_id(tok), device)
            captured.clear()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            rows.append(captured[0][mask.bool()].float())  # real tokens only, not padding
    finally:
        handle.remove()
    inputs = torch.cat(rows)
    return F.normalize(inputs, dim=-1) if unit else inputs


def anchor_floors(keys: torch.Tensor, reference: torch.Tensor, margin: float) -> torch.Tensor:
    """The reference part of each anchor's threshold: R's highest cosine with the key, plus the margin."""
    return (reference.to(keys.device) @ F.normalize(keys.float(), dim=-1).T).max(0).values + margin


def _training_batch(tok: Any, requests: Sequence[Mapping[str, Any]], device: Any):
    """(ids, mask, target mask) of prompt + target_new for every request, the loss read on the target tokens."""
    from revive_plugin.eval.scoring import tokenize_pair

    pairs = [tokenize_pair(tok, _full_prompt(r), r["target_new"]) for r in requests]
    ids, mask = _pad([full for full, _ in pairs], _pad_id(tok), device)
    targets = torch.zeros_like(mask, dtype=torch.bool)
    for i, (full, start) in enumerate(pairs):
        targets[i, start: len(full)] = True
    return ids, mask, targets


def _target_nll(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Equation (3)'s loss: the mean over requests of the mean NLL of their target tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    picked = targets[:, 1:].float()
    return (-(logp * picked).sum(1) / picked.sum(1).clamp(min=1)).mean()


def train_expert(model: nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]], expert: LEMoEExpert,
                 hparams: LEMoEHyperParams) -> list[float]:
    """Fit ``expert`` (already in the adaptor, its anchors set) to the requests with every other parameter of
    the model frozen; returns the loss before each step taken (and the final one)."""
    params = list(model.parameters())
    trainable = {id(p) for p in expert.parameters()}
    flags = [p.requires_grad for p in params]
    losses: list[float] = []
    try:
        for p in params:
            p.requires_grad_(id(p) in trainable)
        ids, mask, targets = _training_batch(tok, requests, next(model.parameters()).device)
        optimiser = torch.optim.Adam(expert.parameters(), lr=hparams.lr, weight_decay=hparams.weight_decay)
        with torch.enable_grad():
            for step in range(hparams.num_steps + 1):
                loss = _target_nll(model, ids, mask, targets)
                losses.append(float(loss.detach()))
                if step == hparams.num_steps or losses[-1] < hparams.stop_loss:
                    break
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for p in expert.parameters():
            p.requires_grad_(False)  # frozen from now on: later batches train only their own expert
    return losses


def apply_lemoe_to_model(model: nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]], hparams: LEMoEHyperParams,
                         copy: bool = False, return_orig_weights: bool = False, keep_original_weight: bool = False,
                         **kwargs: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One LEMoE editing batch: insert the adaptor if needed, add one expert and one anchor per request, train
    the expert (equation (3)), freeze it. Returns (model, weights_copy) as easyeditor's apply functions do.

    ``weights_copy`` (with ``return_orig_weights``): the new expert's V set to zero, which easyeditor's
    BaseEditor writes back to undo the edit (a zero V makes the expert output nothing); like its ROME, the
    PyPI release gets it only with ``keep_original_weight`` (its ``edit`` restores weights_copy after every
    edit), EasyEdit's tree always (it restores only for ``sequential_edit=False``).
    """
    requests = list(requests)
    if not requests:
        return model, {}
    if copy:
        model = copy_module.deepcopy(model)
    adaptor = attach_adaptor(model, hparams)
    keys = request_keys(model, tok, requests, hparams)
    floors = None
    if hparams.reference_corpus:
        floors = anchor_floors(keys, reference_inputs(model, tok, hparams, adaptor), hparams.route_margin)
        dead = [i for i, f in enumerate(floors.tolist()) if f > 1.0]
        if dead:
            logger.warning("LEMoE: %d of %d facts can never route to their expert (a token of the reference corpus "
                           "%s is within cosine %.2f of their key): requests %s", len(dead), len(requests),
                           hparams.reference_corpus, 1 - hparams.route_margin, dead[:10])
    weight = model.get_submodule(hparams.ffn_name)
    like = next(p for n, p in weight.named_parameters() if not n.startswith(f"{ATTR}."))
    generator = torch.Generator().manual_seed(int(hparams.seed) + len(adaptor.experts))
    expert = LEMoEExpert(adaptor.hidden, adaptor.rank, generator, dtype=like.dtype, device=like.device)
    adaptor.add(keys, expert, floors)
    try:
        adaptor.last_losses = train_expert(model, tok, requests, expert, hparams)
    except BaseException:
        adaptor.drop_last(len(requests))  # an interrupted batch leaves no trace
        raise
    weights_copy: dict[str, torch.Tensor] = {}
    if return_orig_weights and (keep_original_weight or _tree_restores()):
        name = f"{hparams.ffn_name}.{ATTR}.experts.{len(adaptor.experts) - 1}.V"
        weights_copy[name] = torch.zeros_like(expert.V)
    return model, weights_copy


def _tree_restores() -> bool:
    """EasyEdit's tree restores weights_copy only for non-sequential edits; the PyPI release after every edit."""
    from . import compat

    return compat.easyeditor_origin()["kind"] != "release"


# -- editor state (checkpoints) ------------------------------------------------------------------------
def lemoe_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The experts and anchors of ``model``'s adaptor as tensors (empty without an adaptor or experts)."""
    found = adaptor_of(model)
    if found is None or len(found[1].experts) == 0:
        return {}
    name, adaptor = found
    layer = _layer_of(name)
    return {
        "lemoe.layer": torch.tensor([layer], dtype=torch.long),
        "lemoe.anchors": adaptor.anchors.detach().cpu().clone(),
        "lemoe.owners": adaptor.owners.detach().cpu().clone(),
        "lemoe.U": torch.stack([e.U.detach().cpu() for e in adaptor.experts]),
        "lemoe.V": torch.stack([e.V.detach().cpu() for e in adaptor.experts]),
        "lemoe.floors": adaptor.floors.detach().cpu().clone(),
    }


def _layer_of(ffn_name: str) -> int:
    digits = [int(part) for part in ffn_name.split(".") if part.isdigit()]
    return digits[-1] if digits else -1


def restore_lemoe_state(model: nn.Module, hparams: LEMoEHyperParams, state: Mapping[str, torch.Tensor]) -> None:
    """Make ``model``'s adaptor hold exactly ``state`` (from ``lemoe_state``), inserting it on the FFN
    ``hparams`` names; an empty state removes the adaptor. Everything is checked before the model changes."""
    if not state:
        detach_adaptor(model)
        return
    missing = sorted(set(STATE_KEYS) - set(state))
    unknown = sorted(set(state) - set(STATE_KEYS) - set(OPTIONAL_STATE_KEYS))
    if missing or unknown:
        raise ValueError(f"LEMoE state: missing {missing}, unknown {unknown} (expected {list(STATE_KEYS)}, "
                         f"optionally {list(OPTIONAL_STATE_KEYS)})")
    layer, anchors, owners, U, V = (state[k] for k in STATE_KEYS)
    floors = state.get("lemoe.floors")
    if floors is None:  # written before per-anchor floors: θ alone, as then
        floors = torch.full((anchors.shape[0],), NO_FLOOR)
    ffn = model.get_submodule(hparams.ffn_name)
    hidden = int(getattr(model.config, "hidden_size", 0) or ffn_input_size(ffn))
    n, r = int(U.shape[0]) if U.ndim == 3 else -1, hparams.expert_rank
    problems = []
    if layer.numel() != 1 or int(layer) != hparams.layers[0]:
        problems.append(f"it is of layer {layer.tolist()}, the hparams put the adaptor on layer {hparams.layers[0]}")
    if tuple(U.shape) != (n, r, hidden) or tuple(V.shape) != (n, hidden, r):
        problems.append(f"experts U {tuple(U.shape)} / V {tuple(V.shape)}; this model and hparams need "
                        f"(n, {r}, {hidden}) / (n, {hidden}, {r})")
    if anchors.ndim != 2 or anchors.shape[1] != hidden or owners.shape != (anchors.shape[0],):
        problems.append(f"anchors {tuple(anchors.shape)} with owners {tuple(owners.shape)}; need (A, {hidden}) / (A,)")
    elif owners.numel() and (owners.dtype != torch.long or int(owners.min()) < 0 or int(owners.max()) >= n):
        problems.append(f"anchor owners must be expert indices in [0, {n})")
    if anchors.ndim == 2 and tuple(floors.shape) != (anchors.shape[0],):
        problems.append(f"anchor floors {tuple(floors.shape)}; need ({anchors.shape[0]},)")
    if problems:
        raise ValueError("LEMoE state does not fit: " + "; ".join(problems))
    detach_adaptor(model)
    adaptor = attach_adaptor(model, hparams)
    reference = next(p for n_, p in ffn.named_parameters() if not n_.startswith(f"{ATTR}."))
    for i in range(n):
        expert = LEMoEExpert(hidden, r, dtype=reference.dtype, device=reference.device)
        with torch.no_grad():
            expert.U.copy_(U[i])
            expert.V.copy_(V[i])
        expert.requires_grad_(False)
        adaptor.experts.append(expert)
    adaptor.anchors = anchors.to(adaptor.anchors.device, torch.float32).clone()
    adaptor.owners = owners.to(adaptor.owners.device).clone()
    adaptor.floors = floors.to(adaptor.floors.device, torch.float32).clone()
