"""Batched z optimisation for MEMIT: every request of an edit batch optimised in one forward/backward.

easyeditor's ``compute_z`` optimises one request's target vector v* = h + δ at a time. The requests of a
batch are independent — each δ only enters its own prompts — so this module optimises all of them
together, with the same objective, optimiser and stopping rule as easyeditor's, request by request:

* per request: the same rewriting prompts (context templates × prompt + target prefix) and KL prompt,
  the same lookup tokens, nll + kl_factor·KL + v_weight_decay·‖δ‖/‖h‖², Adam(lr = v_lr), the same
  early stop (loss < 5e-2, checked before the step) and the same clamp to clamp_norm_factor·‖h‖;
* δ is one [requests, d] tensor under one Adam: Adam is elementwise, so each row follows exactly the
  trajectory it would alone; a request that stopped leaves its chunk and its row is frozen;
* exact savings, not approximations: the log-softmax is taken only at the target tokens (easyeditor takes it
  at every position of every prompt and discards the rest), the model's own logits are not materialised
  (the KL row's logits come from the final norm through the output embeddings), prompts of many requests
  share one padded forward, in chunks of ``chunk`` requests so memory stays bounded, the positions before
  each prompt's lookup token — which δ cannot reach in a causal model — are run once and kept as cached
  keys/values, so each step runs only the rest of the prompt, and the layers up to the z layer, whose output
  δ is added to and so cannot change, run once per chunk: later steps start from their saved output
  (``skip_lower``; for decoder layers that return a plain tensor, as LLaMA-family layers do). Chunks are
  fixed: when requests stop, their rows are cut out of the chunk's saved keys/values and outputs, which are
  kept (regrouping the remaining requests would re-run every chunk's prefix and lower layers — on SmolLM2
  about 1.5 steps' worth of compute each time a request stopped).

Only ``compute_z`` is replaced; key computation, covariance and the update stay easyeditor's.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import compat

#: easyeditor's early-stopping threshold on a request's total z loss.
STOP_LOSS = 5e-2


def _hidden(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _replace_hidden(out: Any, hidden: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return hidden
    return (hidden, *out[1:])


def _lm_head(model: torch.nn.Module, hparams: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [V, d], bias [V]) of the unembedding named by ``hparams.lm_head_module``, as easyeditor reads it."""
    w = model.get_parameter(f"{hparams.lm_head_module}.weight")
    try:
        b = model.get_parameter(f"{hparams.lm_head_module}.bias")
    except AttributeError:
        b = w.new_zeros(w.shape[0])
    return w, b


class _Prepared:
    """Token ids, loss positions and lookup indices of every prompt of every request."""

    def __init__(self, tok: Any, requests: Sequence[Mapping[str, Any]], hparams: Any,
                 context_templates: Sequence[Sequence[str]], device: torch.device):
        find_idx = compat.import_easyeditor("easyeditor.models.memit.compute_z").find_fact_lookup_idx
        self.texts: list[list[str]] = []         # per request: rewriting prompts, then the KL prompt
        self.lookup: list[list[int]] = []
        self.targets: list[torch.Tensor] = []
        self.widths: list[tuple[int, int]] = []  # per request: (longest row after its lookup token, longest row)
        for r in requests:
            target_ids = tok(r["target_new"], return_tensors="pt")["input_ids"][0]
            if target_ids[0] == tok.bos_token_id or target_ids[0] == tok.unk_token_id:
                target_ids = target_ids[1:]
            rewriting = [c.format(r["prompt"]) + tok.decode(target_ids[:-1])
                         for group in context_templates for c in group]
            prompts = rewriting + ["{} is a"]
            texts = [p.format(r["subject"]) for p in prompts]
            idxs = [find_idx(p, r["subject"], tok, hparams.fact_token, verbose=False) for p in prompts]
            lengths = [len(tok(t)["input_ids"]) for t in texts]
            if any(i < 0 for i in idxs):
                # easyeditor pads each request's prompts together: a negative index counts from that length.
                idxs = [i + max(lengths) if i < 0 else i for i in idxs]
            self.widths.append((max(n - i for n, i in zip(lengths, idxs)), max(lengths)))
            self.texts.append(texts)
            self.lookup.append(idxs)
            self.targets.append(target_ids.to(device))
        self.n_rewrite = len(self.texts[0]) - 1 if self.texts else 0

    def batch(self, tok: Any, which: Sequence[int], device: torch.device) -> dict[str, Any]:
        """Padded inputs for the requests ``which`` (right padding, as easyeditor's positions assume)."""
        texts = [t for i in which for t in self.texts[i]]
        side = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = tok(texts, return_tensors="pt", padding=True).to(device)
        finally:
            tok.padding_side = side
        per = self.n_rewrite + 1
        lens = enc["attention_mask"].sum(1)
        rows, idxs, owner = [], [], []
        t_rows, t_pos, t_ids, t_owner, t_norm = [], [], [], [], []
        for j, i in enumerate(which):
            for p in range(per):
                row = j * per + p
                rows.append(row)
                idxs.append(self.lookup[i][p])
                owner.append(j)
                if p < self.n_rewrite:
                    n = len(self.targets[i])
                    end = int(lens[row])
                    t_rows += [row] * n
                    t_pos += list(range(end - n, end))
                    t_ids.append(self.targets[i])
                    t_owner += [j] * n
                    t_norm += [float(n)] * n
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return {
            "enc": enc,
            "rows": as_long(rows), "idxs": as_long(idxs), "owner": as_long(owner),
            "first_rows": as_long([j * per for j in range(len(which))]),
            "kl_rows": as_long([j * per + per - 1 for j in range(len(which))]),
            "t_rows": as_long(t_rows), "t_pos": as_long(t_pos), "t_ids": torch.cat(t_ids),
            "t_owner": as_long(t_owner), "t_norm": torch.tensor(t_norm, device=device),
        }


def chunk_requests(widths: Sequence[tuple[int, int]], chunk: int) -> list[list[int]]:
    """Request indices in groups of ``chunk``, requests of similar ``widths`` (the padded lengths a step runs)
    together: every row of a forward is padded to its chunk's longest, and on CounterFact batches of 100 for
    SmolLM2, grouping by length cut the suffix positions a step computes by about 30% against file order."""
    order = sorted(range(len(widths)), key=lambda i: widths[i])
    return [sorted(order[s:s + chunk]) for s in range(0, len(order), chunk)]


def _split_at_lookup(b: dict[str, Any], fill: int, width: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The batch as a left-padded prefix (tokens before each row's lookup token) and the rest.

    δ enters at the lookup token, so in a causal model every position before it is the same at every step:
    its keys and values are computed once (the prefix pass) and each step runs only the suffix on top of
    them. Returns None when some row's lookup token is its first token (no prefix to cache). ``width``
    (≥ the longest prefix) pads the prefix to a cache made for a larger batch whose rows these are.
    """
    ids, mask = b["enc"]["input_ids"], b["enc"]["attention_mask"]
    idx, lens = b["idxs"], mask.sum(1)
    if int(idx.min()) < 1:
        return None
    rows, width_p, width_s = ids.shape[0], int(idx.max()), int((lens - idx).max())
    if width is not None:
        if width < width_p:
            raise ValueError(f"prefix width {width} is shorter than the longest prefix ({width_p})")
        width_p = width
    pre_ids = torch.full((rows, width_p), fill, dtype=ids.dtype, device=ids.device)
    pre_mask = torch.zeros((rows, width_p), dtype=mask.dtype, device=ids.device)
    suf_ids = torch.full((rows, width_s), fill, dtype=ids.dtype, device=ids.device)
    suf_mask = torch.zeros((rows, width_s), dtype=mask.dtype, device=ids.device)
    for r in range(rows):
        i, n = int(idx[r]), int(lens[r])
        pre_ids[r, width_p - i:] = ids[r, :i]
        pre_mask[r, width_p - i:] = 1
        suf_ids[r, :n - i] = ids[r, i:n]
        suf_mask[r, :n - i] = 1
    out = dict(b)
    out["prefix"] = {"input_ids": pre_ids, "attention_mask": pre_mask,
                     "position_ids": (pre_mask.cumsum(-1) - 1).clamp(min=0)}
    out["enc"] = {"input_ids": suf_ids, "attention_mask": torch.cat([pre_mask, suf_mask], 1),
                  "position_ids": idx[:, None] + torch.arange(width_s, device=ids.device)[None]}
    out["prefix_width"] = width_p
    out["idxs"] = torch.zeros_like(idx)
    out["t_pos"] = b["t_pos"] - idx[b["t_rows"]]
    return out


def _legacy(past: Any) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Per layer (keys, values) of a transformers cache, detached."""
    layers = past.to_legacy_cache() if hasattr(past, "to_legacy_cache") else past
    return tuple((k.detach(), v.detach()) for k, v in layers)


def _cache_from(saved: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> Any:
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(saved)
    return DynamicCache(saved)


@contextlib.contextmanager
def _reusing_lower_layers(below: Sequence[torch.nn.Module], top: torch.nn.Module,
                          saved: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block the layers ``below`` pass their input through and ``top`` (the z layer, or for δ inside
    a layer the one under it) returns ``saved`` (its output at the chunk's first step), so a step computes only
    the layers above (no-op if None).

    ``top``'s forward hooks still run on ``saved`` (with δ on the z layer's output, that is where it is added).
    """
    if saved is None:
        yield
        return
    for m in below:
        m.forward = lambda hidden_states, *args, **kwargs: hidden_states
    top.forward = lambda *args, **kwargs: saved
    try:
        yield
    finally:
        for m in (*below, top):
            del m.forward


def compute_zs(
    model: torch.nn.Module,
    tok: Any,
    requests: Sequence[Mapping[str, Any]],
    hparams: Any,
    layer: int,
    context_templates: Sequence[Sequence[str]],
    chunk: int = 16,
    progress: bool = True,
    prefix_cache: bool = True,
    skip_lower: bool = True,
    delta_module: Optional[str] = None,
) -> list[torch.Tensor]:
    """Target vectors v* = h + δ at ``layer`` for every request, optimised together (see module docstring).

    :param requests: easyeditor-normalised requests (``prompt`` with ``{}``, ``target_new`` with its space).
    :param chunk: requests per forward pass (bounds activation memory; results do not depend on it).
    :param prefix_cache: compute the positions before each lookup token once (keys/values cached) instead of
        at every step; exact, and off only for models whose forward takes no ``past_key_values``.
    :param skip_lower: run the layers up to ``layer`` once per chunk and reuse their output at later steps; exact
        (the same tensors), used where those layers return a plain tensor.
    :param delta_module: template of the module inside layer ``layer`` whose output δ is added to and v* starts
        from (ROME's ``compute_v``: ``hparams.mlp_module_tmp``); None: the layer's own output (MEMIT's
        ``compute_z``). The layers below ``layer`` are then the ones run once per chunk.
    :returns: one [d] tensor per request, in order.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of requests per forward pass, got {chunk!r}")
    if not requests:
        return []
    device = next(model.parameters()).device
    prep = _Prepared(tok, requests, hparams, context_templates, device)
    loss_layer = max(int(hparams.v_loss_layer), layer)
    layer_mod = model.get_submodule(hparams.layer_module_tmp.format(layer))
    loss_mod = model.get_submodule(hparams.layer_module_tmp.format(loss_layer))
    # δ's module, and the module whose output later steps reuse (the layer itself, or the one below δ's layer)
    delta_mod = layer_mod if delta_module is None else model.get_submodule(delta_module.format(layer))
    reuse_at = layer if delta_module is None else layer - 1
    ln_f = model.get_submodule(hparams.ln_f_module)
    out_emb = model.get_output_embeddings()
    lm_w, lm_b = _lm_head(model, hparams)
    forward_args = inspect.signature(model.forward).parameters
    keep_arg = "logits_to_keep" in forward_args
    prefix_cache = prefix_cache and "past_key_values" in forward_args and "position_ids" in forward_args
    fill = tok.pad_token_id if tok.pad_token_id is not None else 0
    logits_kw: dict[str, Any] = {"logits_to_keep": 1} if keep_arg else {}  # no logits beyond the last position
    built: dict[int, dict[str, Any]] = {}   # per chunk: its members, inputs and saved prefix keys/values
    lower: dict[int, torch.Tensor] = {}     # per chunk: the reused module's output (before δ)
    layers = [model.get_submodule(hparams.layer_module_tmp.format(i)) for i in range(reuse_at + 1)]
    reuse_mod, below = (layers[-1], layers[:-1]) if layers else (None, [])
    n = len(requests)
    # Fixed chunks: members only leave (when they stop), so the chunks' saved passes stay usable.
    chunks = chunk_requests([w if prefix_cache else w[::-1] for w in prep.widths], chunk)
    d = int(getattr(model.config, "n_embd", None) or model.config.hidden_size)
    delta = torch.zeros((n, d), device=device, requires_grad=True)
    target_init = torch.zeros((n, d), device=device)
    kl_init: list[Optional[torch.Tensor]] = [None] * n
    opt = torch.optim.Adam([delta], lr=hparams.v_lr)
    max_norm = None
    per = prep.n_rewrite + 1  # rows of one request in a chunk's batch
    active = list(range(n))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)

    state: dict[str, Any] = {}

    def at_reuse(_m: Any, _inp: Any, out: Any) -> None:
        if not state.get("prefix_pass") and isinstance(out, torch.Tensor) and state["key"] not in lower:
            lower[state["key"]] = out.detach()

    def at_layer(_m: Any, _inp: Any, out: Any) -> Any:
        if state.get("prefix_pass"):
            return out
        h = _hidden(out)
        b = state["b"]
        if state["record"]:
            target_init[state["which"]] = h[b["first_rows"], b["idxs"][b["first_rows"]]].detach()
        add = torch.zeros_like(h)
        add = add.index_put((b["rows"], b["idxs"]), delta[state["which"]][b["owner"]], accumulate=True)
        h = h + add
        out = _replace_hidden(out, h)
        if delta_mod is loss_mod:
            state["loss_h"] = h
        return out

    def at_loss(_m: Any, _inp: Any, out: Any) -> None:
        if not state.get("prefix_pass"):
            state["loss_h"] = _hidden(out)

    def at_norm(_m: Any, _inp: Any, out: Any) -> None:
        if not state.get("prefix_pass"):
            state["normed"] = out

    # The reuse hook first: on a shared module it saves the output before δ is added.
    hooks = [reuse_mod.register_forward_hook(at_reuse)] if skip_lower and reuse_mod is not None else []
    hooks += [delta_mod.register_forward_hook(at_layer), ln_f.register_forward_hook(at_norm)]
    if delta_mod is not loss_mod:
        hooks.append(loss_mod.register_forward_hook(at_loss))
    steps = int(hparams.v_num_grad_steps)
    bar = tqdm(total=steps, desc=f"z ({n} requests)", leave=False, disable=not progress)
    try:
        for it in range(steps):
            opt.zero_grad()
            done_now: list[int] = []
            for key, which in enumerate(chunks):
                if not which:
                    continue
                entry = built.get(key)
                if entry is None:
                    entry = built[key] = {"which": which, "b": prep.batch(tok, which, device), "saved": None}
                    split = _split_at_lookup(entry["b"], fill) if prefix_cache else None
                    if split is not None:
                        state["prefix_pass"] = True
                        try:
                            with torch.no_grad():
                                past = model(**split["prefix"], use_cache=True, **logits_kw).past_key_values
                        finally:
                            state["prefix_pass"] = False
                        entry.update(b=split, saved=_legacy(past))
                elif entry["which"] != which:  # requests stopped: keep the rows of those that go on
                    going_on = set(which)
                    kept = [j for j, i in enumerate(entry["which"]) if i in going_on]
                    rows = torch.tensor([j * per + p for j in kept for p in range(per)], device=device)
                    b = prep.batch(tok, which, device)
                    if entry["saved"] is not None:
                        b = _split_at_lookup(b, fill, width=entry["b"]["prefix_width"])
                        entry["saved"] = tuple((k[rows], v[rows]) for k, v in entry["saved"])
                    entry.update(which=which, b=b)
                    if key in lower:
                        lower[key] = lower[key][rows, :b["enc"]["input_ids"].shape[1]]
                b = entry["b"]
                kwargs: dict[str, Any] = dict(logits_kw)
                if entry["saved"] is not None:
                    # A fresh cache object each step: the forward appends this step's suffix to it.
                    kwargs.update(past_key_values=_cache_from(entry["saved"]), use_cache=True)
                else:
                    kwargs["use_cache"] = False
                state.update(b=b, which=torch.tensor(which, device=device), record=(it == 0), key=key)
                with _reusing_lower_layers(below, reuse_mod, lower.get(key)):
                    model(**b["enc"], **kwargs)
                normed = state.pop("normed")
                kl_logits = out_emb(normed[b["kl_rows"], b["idxs"][b["kl_rows"]]])
                kl_logp = torch.log_softmax(kl_logits, dim=-1)
                h = state.pop("loss_h")[b["t_rows"], b["t_pos"]]
                logp = torch.log_softmax(ln_f(h) @ lm_w.T + lm_b, dim=-1)
                tok_lp = logp.gather(1, b["t_ids"].unsqueeze(1)).squeeze(1) / b["t_norm"]
                nll = torch.zeros(len(which), device=device).index_add(0, b["t_owner"], -tok_lp) / prep.n_rewrite
                if it == 0:
                    for j, i in enumerate(which):
                        kl_init[i] = kl_logp[j].detach().clone()
                init = torch.stack([kl_init[i] for i in which])
                # kl_div(input=init, target=current, log_target) as easyeditor calls it, per request.
                kl = hparams.kl_factor * (kl_logp.exp() * (kl_logp - init)).sum(-1)
                rows = delta[which]
                wd = hparams.v_weight_decay * rows.norm(dim=1) / target_init[which].norm(dim=1) ** 2
                loss = nll + kl + wd
                finished = (loss < STOP_LOSS).tolist()
                done_now += [i for i, f in zip(which, finished) if f]
                if it < steps - 1:
                    # Stopped requests contribute no gradient; the rest are independent, so summing is exact.
                    keep = torch.tensor([not f for f in finished], device=device)
                    (loss * keep).sum().backward()
            bar.update(1)
            stopped = set(done_now)
            active = [i for i in active if i not in stopped]
            chunks = [[i for i in members if i not in stopped] for members in chunks]
            bar.set_postfix(active=len(active))
            if it == steps - 1 or not active:
                break
            frozen = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                moving = torch.zeros(n, dtype=torch.bool, device=device)
                moving[active] = True
                delta[~moving] = frozen[~moving]
                if max_norm is None:
                    max_norm = hparams.clamp_norm_factor * target_init.norm(dim=1)
                norms = delta.norm(dim=1)
                over = moving & (norms > max_norm)
                delta[over] = delta[over] * (max_norm[over] / norms[over]).unsqueeze(1)
    finally:
        bar.close()
        for hk in hooks:
            hk.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    targets = (target_init + delta).detach()
    return [targets[i] for i in range(n)]
