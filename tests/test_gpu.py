"""The GPU path (marker ``gpu``): real easyeditor edits + REVIVE, batched z, the harness's scoring and the filter on CUDA.

Skipped where there is no CUDA. ``REVIVE_TEST_DEVICE=cpu`` runs the same checks on the CPU (what
``scripts/device-check.sh`` does in its CPU mode, so the checks themselves are exercised without a GPU); the
comparisons with the CPU are then CPU against CPU. ``REVIVE_GPU_REPORT=FILE`` appends each check's measurements
(device, seconds, differences) to FILE as JSON lines; they are printed too.
"""
from __future__ import annotations

import copy
import json
import os
import time

import pytest
import torch

from revive_plugin import ReviveFilter, protected_basis
from revive_plugin.adapters import batched_z as bz
from revive_plugin.adapters import compat, easyedit, stats
from revive_plugin.adapters.compat import import_easyeditor
from revive_plugin.adapters.models import load_model
from revive_plugin.eval.datasets import load_counterfact
from revive_plugin.eval.harness import evaluate_facts
from revive_plugin.eval.perplexity import load_sentences, perplexity
from revive_plugin.eval.scoring import score_continuations
from revive_plugin.eval.testing import random_model_like, tiny_llama, tiny_tokenizer

from test_batched_z import REQUESTS, TEMPLATES, Z_LAYER, hparams
from test_easyedit import FT, MEMIT, REQUEST, REQUEST2, ROME, edited_weights, editor_for, load, write_hparams

DEVICE_ENV = "REVIVE_TEST_DEVICE"
REPORT_ENV = "REVIVE_GPU_REPORT"
DEVICE = torch.device(os.environ.get(DEVICE_ENV) or "cuda")
ON_CUDA = DEVICE.type == "cuda"
needs_device = pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(),
                                  reason=f"needs CUDA (none here); {DEVICE_ENV}=cpu runs these checks on the CPU")

pytestmark = pytest.mark.usefixtures("one_thread")


def sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def devices(x) -> set[str]:
    """Device types of every tensor in ``x`` (nested tuples, lists, dicts)."""
    if isinstance(x, torch.Tensor):
        return {x.device.type}
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return set().union(*(devices(v) for v in x)) if x else set()
    return set()


@pytest.fixture
def report():
    path = os.environ.get(REPORT_ENV)

    def write(**row) -> None:
        row = {"device": str(DEVICE), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if ON_CUDA else None, **row}
        line = json.dumps(row)
        print(line)
        if path:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    return write


@pytest.fixture
def on_device(tmp_path, monkeypatch):
    """enable_easyedit() as a user on this device calls it; yields the targets of every CUDA redirect opened."""
    monkeypatch.setenv("REVIVE_CACHE", str(tmp_path / "cache"))
    opened = []

    class Recording(compat._CudaRedirect):
        def __init__(self, target):
            opened.append(target)
            super().__init__(target)

    monkeypatch.setattr(compat, "_CudaRedirect", Recording)
    easyedit.enable_easyedit(device=None if ON_CUDA else "cpu")
    yield opened
    easyedit.disable_easyedit()


def spy(monkeypatch, module, name, seen: list, on_args: bool = False) -> None:
    """Record the device types of what ``module.name`` returns (or, ``on_args``, of the model it is given)."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        if on_args:
            seen.append({p.device.type for p in args[0].parameters()})
        out = original(*args, **kwargs)
        if not on_args:
            seen.append(devices(out))
        return out

    monkeypatch.setattr(module, name, wrapper)


#: editor → (hparams of test_easyedit, extra hparams). MEMIT twice: easyeditor's compute_z and the batched path.
EDITORS = {"MEMIT": (MEMIT, {}), "MEMIT-batched-z": (MEMIT, {"batched_z": True}), "ROME": (ROME, {}), "FT": (FT, {})}


@pytest.mark.parametrize("case", list(EDITORS))
@pytest.mark.gpu
@needs_device
def test_easyeditor_edits_with_revive_stay_on_the_device(case, tmp_path, on_device, tiny_model_dir, monkeypatch,
                                                         report):
    """Weights, statistics, REVIVE's basis cache and the z optimisation on the device; no CPU redirect on CUDA."""
    base, extra = EDITORS[case]
    alg, tau = base["alg_name"], 0.3
    seen = {"statistics pass": [], "covariance": [], "z": []}
    spy(monkeypatch, stats, "second_moments", seen["statistics pass"], on_args=True)
    if alg == "MEMIT":
        memit_main = import_easyeditor("easyeditor.models.memit.memit_main")
        spy(monkeypatch, memit_main, "get_cov", seen["covariance"])
        spy(monkeypatch, memit_main, "compute_z", seen["z"])
        spy(monkeypatch, bz, "compute_zs", seen["z"])
    elif alg == "ROME":
        spy(monkeypatch, import_easyeditor("easyeditor.models.rome.compute_u"), "get_inv_cov", seen["covariance"])
        spy(monkeypatch, import_easyeditor("easyeditor.models.rome.rome_main"), "compute_v", seen["z"])
    hp = load(alg, write_hparams(tmp_path, base, tiny_model_dir, revive={"tau": tau}, **extra))
    torch.manual_seed(0)
    editor = editor_for(hp)
    weights = edited_weights(editor, hp)
    w0 = {n: w.detach().clone() for n, w in weights.items()}
    started = time.perf_counter()
    editor.edit(**REQUEST, keep_original_weight=False, verbose=False)
    editor.edit(**REQUEST2, keep_original_weight=False, verbose=False)  # sequential: accumulates
    sync()
    seconds = time.perf_counter() - started

    assert {p.device.type for p in editor.model.parameters()} == {DEVICE.type}
    if alg != "FT":  # FT uses no statistics and no target vectors
        for what, found in seen.items():
            assert found, f"{case}: no {what} was computed"
            assert all(d == {DEVICE.type} for d in found), (what, found)
    if ON_CUDA:
        assert easyedit._STATE.device is None and on_device == [], "a CUDA->CPU redirect was active on CUDA"
    else:
        assert on_device and all(t == torch.device("cpu") for t in on_device)
    revive = easyedit.host_for(editor.model).state["revive"]
    changed = 0
    for n, w in weights.items():
        cached = revive.reference(n)
        assert cached is not None and devices([cached.u, cached.v, cached.singular_values]) == {DEVICE.type}
        total = w.detach() - w0[n]
        if not torch.any(total):
            continue
        changed += 1
        b = protected_basis(w0[n], tau)
        scale = float(total.norm())
        assert float((b.u.T.to(total.dtype) @ total).norm()) <= 1e-4 * scale + 1e-6
        assert float((total @ b.v.to(total.dtype)).norm()) <= 1e-4 * scale + 1e-6
    assert changed >= 1
    report(check="edit", editor=case, edits=2, seconds=round(seconds, 3), weights_changed=changed,
           redirects=len(on_device))


@pytest.mark.gpu
@needs_device
def test_batched_z_on_the_device_equals_the_cpu(tmp_path, on_device, tiny_model_dir, report):
    model, tok = load_model(str(tiny_model_dir), padding_side="right")
    hp = hparams(tmp_path, tiny_model_dir, v_num_grad_steps=6)
    on_cpu = bz.compute_zs(model, tok, REQUESTS, hp, Z_LAYER, TEMPLATES, chunk=2, progress=False)
    moved = copy.deepcopy(model).to(DEVICE)
    started = time.perf_counter()
    on_dev = bz.compute_zs(moved, tok, REQUESTS, hp, Z_LAYER, TEMPLATES, chunk=2, progress=False)
    sync()
    seconds = time.perf_counter() - started
    worst = 0.0
    for c, d in zip(on_cpu, on_dev):
        assert d.device.type == DEVICE.type
        diff = float((c - d.cpu()).abs().max())
        worst = max(worst, diff / float(c.abs().max()))
        assert diff <= 1e-4 * float(c.abs().max()) + 1e-5, diff
    # The optimisation moved every vector on the device (equal results are not two untouched initial vectors).
    init = bz.compute_zs(moved, tok, REQUESTS, hparams(tmp_path, tiny_model_dir, v_num_grad_steps=1), Z_LAYER,
                         TEMPLATES, progress=False)
    assert all(float((d - i).norm()) > 1e-3 for d, i in zip(on_dev, init))
    report(check="batched_z", requests=len(REQUESTS), steps=6, seconds=round(seconds, 3),
           max_relative_diff_vs_cpu=worst)


@pytest.mark.gpu
@needs_device
def test_harness_scoring_on_the_device_equals_the_cpu(report):
    tok = tiny_tokenizer(add_bos=False)
    model = tiny_llama(vocab_size=len(tok), seed=0)
    moved = copy.deepcopy(model).to(DEVICE)
    cases = load_counterfact(limit=4)
    prompts = [c.prompt for c in cases] + [p for c in cases for p in c.neighborhood_prompts[:2]]
    conts = [c.target_new for c in cases] + [c.target_true for c in cases for _ in c.neighborhood_prompts[:2]]
    worst = 0.0
    for side in ("left", "right"):
        tok.padding_side = side
        on_cpu = score_continuations(model, tok, prompts, conts, batch_size=3)
        on_dev = score_continuations(moved, tok, prompts, conts, batch_size=3)
        for c, d in zip(on_cpu, on_dev):
            assert d.target_ids == c.target_ids and d.argmax_ids == c.argmax_ids
            assert list(d.token_logprobs) == pytest.approx(list(c.token_logprobs), abs=1e-4)
            worst = max(worst, max(abs(a - b) for a, b in zip(c.token_logprobs, d.token_logprobs)))
    tok.padding_side = "right"
    facts_cpu, facts_dev = evaluate_facts(model, tok, cases), evaluate_facts(moved, tok, cases)
    assert facts_dev.keys() == facts_cpu.keys()
    for key, value in facts_cpu.items():
        assert facts_dev[key] == pytest.approx(value, abs=1e-5), key
    texts = load_sentences(None, 16)
    ppl_cpu, ppl_dev = perplexity(model, tok, texts), perplexity(moved, tok, texts)
    assert ppl_dev["ppl_tokens"] == ppl_cpu["ppl_tokens"]
    assert ppl_dev["ppl"] == pytest.approx(ppl_cpu["ppl"], rel=1e-5)
    report(check="scoring", pairs=len(prompts), max_abs_logprob_diff_vs_cpu=worst,
           ppl_cpu=ppl_cpu["ppl"], ppl_device=ppl_dev["ppl"])


def _spectral_weight(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """An m×n weight with a decaying spectrum (σᵢ ∝ i^-0.7 + 0.05), built on the device."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, device=DEVICE))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, device=DEVICE))
    s = torch.arange(1, r + 1, dtype=torch.float32, device=DEVICE) ** -0.7 + 0.05
    return (u * s) @ v.T


@pytest.mark.gpu
@needs_device
def test_filter_cost_on_a_llama3_sized_weight(report):
    """REVIVE on a 4096×14336 weight (LLaMA3-8B's down projection) on the device: the invariant holds, the
    basis and the filtered delta stay there; the time of the basis (first step) and of a cached step is
    reported, not asserted. ``REVIVE_FILTER_SHAPE=MxN`` changes the shape (the CPU mode uses 576×1536)."""
    default = "4096x14336" if ON_CUDA else "576x1536"
    m, n = (int(x) for x in (os.environ.get("REVIVE_FILTER_SHAPE") or default).split("x"))
    w = _spectral_weight(m, n)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    delta = (torch.randn(m, 100, generator=g, device=DEVICE) @ torch.randn(100, n, generator=g, device=DEVICE)) * 1e-3
    name = "model.layers.0.mlp.down_proj.weight"
    filt = ReviveFilter({"tau": 0.1})
    sync()
    started = time.perf_counter()
    safe = filt.filter(name, delta, w, layer=0)  # first step: the basis of W₀ (SVD), then the projection
    sync()
    first = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(3):
        again = filt.filter(name, delta, w, layer=0)
    sync()
    cached = (time.perf_counter() - started) / 3
    basis = filt.reference(name)
    assert devices([basis.u, basis.v, safe, again]) == {DEVICE.type}
    assert basis.k >= 1 and tuple(safe.shape) == (m, n)
    assert torch.equal(safe, again)
    scale = float(safe.norm())
    u, v = basis.u.to(safe.dtype), basis.v.to(safe.dtype)  # float64 for small weights, float32 for this one
    assert float((u.T @ safe).norm()) <= 1e-4 * scale
    assert float((safe @ v).norm()) <= 1e-4 * scale
    assert float((delta - safe).norm()) > 1e-3 * float(delta.norm())  # it removed something
    cache_bytes = sum(t.numel() * t.element_size() for t in (basis.u, basis.v, basis.singular_values))
    report(check="filter_cost", shape=f"{m}x{n}", k=basis.k, delta_rank=100, first_step_s=round(first, 4),
           cached_step_s=round(cached, 5), cache_mib=round(cache_bytes / 2**20, 2))


def test_random_model_like_keeps_shape_and_tokenizer(tmp_path, tiny_model_dir):
    """The stand-in for a model whose weights cannot travel (device-check.sh's SmolLM2-shaped run)."""
    source = tmp_path / "no-weights"
    source.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (source / f.name).write_bytes(f.read_bytes())
    target = random_model_like(source, tmp_path / "shaped", seed=3)
    model, tok = load_model(str(target))
    original, original_tok = load_model(str(tiny_model_dir))
    assert model.config.to_dict()["num_hidden_layers"] == original.config.num_hidden_layers
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in original.named_parameters()}
    assert tok("The capital of Italy is")["input_ids"] == original_tok("The capital of Italy is")["input_ids"]
    w = model.get_parameter("model.layers.1.mlp.down_proj.weight")
    assert not torch.equal(w, original.get_parameter("model.layers.1.mlp.down_proj.weight"))
    again, _ = load_model(str(random_model_like(source, tmp_path / "again", seed=3)))
    assert torch.equal(w, again.get_parameter("model.layers.1.mlp.down_proj.weight"))  # seeded
