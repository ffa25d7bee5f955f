"""The keys of an edit step's requests, for ``context.keys`` (see "Keys of a step" in ``revive_plugin.hookspecs``).

Locate-then-edit editors treat an edited weight as a linear associative memory W k ≈ v: the *key* k of a fact
is the input of the weight's module at the fact's subject. Here, for a request with prompt p and subject s:

* the text is p with s filled in (p may hold the subject itself, as EasyEdit's requests do, or ``{}`` standing
  for it, as MEMIT's normalised requests do);
* the key position is the last token of the first occurrence of s: ``len(tok(text up to the end of s)) − 1``,
  as ROME's ``repr_tools`` finds ``subject_last`` (the tokenizer's own special tokens included, padding
  accounted for through the attention mask);
* the key at parameter ``<module>.weight`` is the input of ``<module>`` at that position (``mlp.down_proj``:
  the SwiGLU activation the down projection reads; GPT-2's ``mlp.c_proj``: the GELU activation), in float32.

Differences from the editors' own keys, chosen so that one definition serves every editor: the request's own
prompt only (ROME and MEMIT average the key over a few sampled context-template prefixes; FT has no key), and
always the subject's last token (an editor configured with ``fact_token: last`` reads the prompt's last token).
A request whose subject is empty or not in its prompt uses the prompt's last token, with a warning.

The model is evaluated with the parameter values the host hands over (W_before of the step's targets) through
``torch.func.functional_call``, so nothing is written into the live model, in eval mode (dropout off; the
modules' training flags are put back), without gradients, and the forward pass stops as soon as every wanted
module has read its input (the layers above are not run).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

#: Texts per forward pass.
CHUNK = 16


class _Stop(Exception):
    """Raised from a hook once every wanted module has read its input: the rest of the forward pass is skipped."""


def subject_positions(tok: Any, prompts: Sequence[str], subjects: Sequence[Optional[str]]) -> tuple[list[str], list[int]]:
    """(texts, index of the subject's last token in each text's own tokenization)."""
    texts, positions = [], []
    for prompt, subject in zip(prompts, subjects):
        subject = subject or ""
        if "{}" in prompt:
            text = prompt.replace("{}", subject)
            upto = prompt[: prompt.index("{}")] + subject if subject else None
        else:
            text = prompt
            at = prompt.find(subject) if subject else -1
            upto = prompt[: at + len(subject)] if at >= 0 else None
        if upto is None:
            warnings.warn(f"the subject {subject!r} is not in the prompt {prompt!r}: its key is taken at the prompt's "
                          "last token", RuntimeWarning, stacklevel=3)
            upto = text
        texts.append(text)
        positions.append(len(tok(upto)["input_ids"]) - 1)
    return texts, positions


def module_inputs(
    model: torch.nn.Module,
    tok: Any,
    texts: Sequence[str],
    positions: Sequence[int],
    modules: Mapping[str, str],
    params: Optional[Mapping[str, torch.Tensor]] = None,
    chunk: int = CHUNK,
) -> dict[str, torch.Tensor]:
    """The input of each module at one token of each text: ``{key: Tensor[len(texts), d_in]}`` (float32, CPU
    when the model is on the CPU).

    :param modules: key → module name in ``model`` (e.g. a parameter name → its owning module).
    :param positions: per text, the token index in its own (unpadded) tokenization.
    :param params: parameter values to evaluate the model with instead of its own (``functional_call``).
    """
    device = next(model.parameters()).device
    owners = {key: model.get_submodule(name) for key, name in modules.items()}
    wanted = set(owners.values())
    found: dict[str, list[torch.Tensor]] = {key: [] for key in owners}
    batch: dict[str, Any] = {}
    seen: dict[torch.nn.Module, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        seen[module] = x[batch["rows"], batch["cols"]].detach().float()
        if len(seen) == len(wanted):
            raise _Stop

    handles = [m.register_forward_pre_hook(hook) for m in wanted]
    training = {m: m.training for m in model.modules()}
    step = chunk if tok.pad_token_id is not None else 1  # without a pad token, one text per pass
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(texts), step):
                part, where = list(texts[start:start + step]), list(positions[start:start + step])
                enc = tok(part, return_tensors="pt", padding=len(part) > 1)
                mask = enc["attention_mask"]
                cols = []
                for i, pos in enumerate(where):
                    real = mask[i].nonzero().squeeze(-1)  # the text's own tokens, whichever side is padded
                    cols.append(int(real[min(pos, len(real) - 1)]))
                batch["rows"], batch["cols"] = torch.arange(len(part), device=device), torch.tensor(cols, device=device)
                seen.clear()
                inputs = {"input_ids": enc["input_ids"].to(device), "attention_mask": mask.to(device), "use_cache": False}
                try:
                    if params is None:
                        model(**inputs)
                    else:
                        torch.func.functional_call(model, dict(params), args=(), kwargs=inputs)
                except _Stop:
                    pass
                missing = [modules[k] for k, m in owners.items() if m not in seen]
                if missing:
                    raise RuntimeError(f"the modules {missing} did not run in the forward pass: no keys for them")
                for key, module in owners.items():
                    found[key].append(seen[module])
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    return {key: torch.cat(parts) for key, parts in found.items()}


def request_keys(model: torch.nn.Module, tok: Any, requests: Sequence[Mapping[str, Any]]) -> Callable[..., dict]:
    """The ``keys`` provider of ``PluginHost.run_step`` for one editor call: ``(names, weights) → {name: keys}``,
    the keys of ``requests`` (prompt and subject read now, before the editor may change the requests) at each
    parameter's owning module, evaluated with ``weights`` in place of the live parameters."""
    prompts = [str(r["prompt"]) for r in requests]
    subjects = [r.get("subject") for r in requests]

    def provide(names: Sequence[str], weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        texts, positions = subject_positions(tok, prompts, subjects)
        modules = {name: name.rsplit(".", 1)[0] for name in names}
        return module_inputs(model, tok, texts, positions, modules, params=weights)

    return provide
