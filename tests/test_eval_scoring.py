"""Batched log-prob scoring and greedy generation against one-sequence-at-a-time references on a tiny LLaMA."""
import copy

import pytest
import torch

from revive_plugin.eval.generation import generate_texts
from revive_plugin.eval.scoring import join_continuation, score_continuations, tokenize_pair
from revive_plugin.eval.testing import tiny_llama, tiny_tokenizer
from revive_plugin.eval.tokenization import encode, special_affixes

# Different lengths so that batches need real padding; multi-token continuations included.
PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "The capital of France is",
    "Review : a great and moving film\nSentiment :",
    "Microsoft developed",
    "question: Paris is in France. True or False?\nanswer:",
]
CONTS = ["French", "Paris and Rome", "positive", "Windows", " True"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "nobos"])
def tok(request):
    return tiny_tokenizer(add_bos=request.param)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=400, seed=0)


def reference(model, tok, prompt, cont):
    """One unpadded sequence, full logits, no batching: the definition the batched code must match."""
    ids = tok(join_continuation(prompt, cont))["input_ids"]
    start = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    targets = ids[start:]
    lps = [logp[start - 1 + j, t].item() for j, t in enumerate(targets)]
    argmax = [logp[start - 1 + j].argmax().item() for j in range(len(targets))]
    return targets, lps, argmax


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_scores_equal_unpadded_reference(model, tok, side):
    tok.padding_side = side  # the tokenizer's own side is what score_continuations follows by default
    batched = score_continuations(model, tok, PROMPTS, CONTS, batch_size=3)
    single = [score_continuations(model, tok, [p], [c], batch_size=1)[0] for p, c in zip(PROMPTS, CONTS)]
    for s, u, p, c in zip(batched, single, PROMPTS, CONTS):
        targets, lps, argmax = reference(model, tok, p, c)
        assert s.target_ids == tuple(targets) == u.target_ids
        assert s.n_tokens == len(targets)
        assert s.sum_logprob == pytest.approx(sum(lps), abs=1e-4)
        assert s.sum_logprob == pytest.approx(u.sum_logprob, abs=1e-4)
        assert s.mean_logprob == pytest.approx(sum(lps) / len(lps), abs=1e-4)
        assert list(s.token_logprobs) == pytest.approx(lps, abs=1e-4)
        assert s.argmax_ids == tuple(argmax)
        assert s.correct == tuple(a == t for a, t in zip(argmax, targets))
    assert tok.padding_side == side


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_token_targets_share_their_prompts_forward(model, tok, side):
    tok.padding_side = side
    prompts = [p for p in PROMPTS for _ in CONTS] + PROMPTS[:1]   # every prompt against every target, one twice
    conts = [c for _ in PROMPTS for c in CONTS] + CONTS[:1]
    rows = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        scores = score_continuations(model, tok, prompts, conts, batch_size=4)
    finally:
        hook.remove()
    single_token = sum(len(reference(model, tok, p, c)[0]) == 1 for p, c in zip(prompts, conts))
    assert single_token >= len(PROMPTS) * 2  # the case this path exists for
    assert sum(rows) < len(prompts)           # fewer sequences ran than pairs were scored
    for s, p, c in zip(scores, prompts, conts):
        targets, lps, argmax = reference(model, tok, p, c)
        assert s.target_ids == tuple(targets)
        assert list(s.token_logprobs) == pytest.approx(lps, abs=1e-4)
        assert s.argmax_ids == tuple(argmax)


def test_left_padding_with_absolute_position_embeddings(tok):
    """GPT-2 adds learned absolute positions, so left padding is only right if position ids skip the pads.

    (RoPE models such as LLaMA are shift-invariant and would not notice.)
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=256)).eval()
    batched = score_continuations(gpt2, tok, PROMPTS, CONTS, batch_size=5, padding_side="left")
    for s, p, c in zip(batched, PROMPTS, CONTS):
        assert s.sum_logprob == pytest.approx(sum(reference(gpt2, tok, p, c)[1]), abs=1e-4)


def test_multi_token_continuation_is_scored_in_full(model, tok):
    s = score_continuations(model, tok, ["The capital of France is"], ["Paris and Rome"])[0]
    assert tok.decode(list(s.target_ids)) == " Paris and Rome"
    assert s.n_tokens >= 3
    assert s.mean_nll == pytest.approx(-s.sum_logprob / s.n_tokens)


def test_bos_is_fed_but_never_scored():
    with_bos, without = tiny_tokenizer(add_bos=True), tiny_tokenizer(add_bos=False)
    assert special_affixes(with_bos) == (1, 0) and special_affixes(without) == (0, 0)
    ids_b, start_b = tokenize_pair(with_bos, "The capital of France is", "Paris")
    ids_n, start_n = tokenize_pair(without, "The capital of France is", "Paris")
    assert ids_b[0] == with_bos.bos_token_id and ids_b[1:] == ids_n
    assert start_b == start_n + 1 and ids_b[start_b:] == ids_n[start_n:]


def test_empty_prompt_needs_bos(model):
    s = score_continuations(model, tiny_tokenizer(add_bos=True), [""], ["Paris"])[0]
    assert s.target_ids == tuple(tiny_tokenizer(add_bos=False)("Paris")["input_ids"])
    with pytest.raises(ValueError, match="no BOS"):
        score_continuations(model, tiny_tokenizer(add_bos=False), [""], ["Paris"])


def test_tokenizer_without_pad_is_left_untouched(model):
    tok = copy.deepcopy(tiny_tokenizer(add_bos=True, padding_side="left"))
    tok.pad_token = None
    out = score_continuations(model, tok, PROMPTS, CONTS, batch_size=5)
    assert tok.pad_token is None and tok.padding_side == "left"
    ref = score_continuations(model, tiny_tokenizer(add_bos=True), PROMPTS, CONTS, batch_size=1)
    assert [o.sum_logprob for o in out] == pytest.approx([r.sum_logprob for r in ref], abs=1e-4)


def test_model_ignoring_logits_to_keep_still_scores_right(model, tok):
    class FullLogits(torch.nn.Module):  # accepts logits_to_keep but returns every position
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    a = score_continuations(FullLogits(model), tok, PROMPTS, CONTS, batch_size=5)
    b = score_continuations(model, tok, PROMPTS, CONTS, batch_size=5)
    assert [x.sum_logprob for x in a] == pytest.approx([x.sum_logprob for x in b], abs=1e-5)


def test_train_mode_is_restored(model, tok):
    model.train()
    try:
        score_continuations(model, tok, PROMPTS[:1], CONTS[:1])
        assert model.training
    finally:
        model.eval()


def test_space_convention():
    assert join_continuation("The capital is", "Paris") == "The capital is Paris"
    assert join_continuation("The capital is", " Paris") == "The capital is Paris"
    assert join_continuation("Answer: ", "Yes") == "Answer: Yes"
    assert join_continuation("", "Paris") == "Paris"


def test_argument_errors(model, tok):
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        score_continuations(model, tok, ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(model, tok, ["a"], [""])
    with pytest.raises(ValueError, match="exceed"):
        score_continuations(tiny_llama(400, max_position_embeddings=4), tok, ["The capital of France is"], ["Paris"])


def test_encodings_are_cached(tok):
    first = encode(tok, "The capital of France is")
    assert encode(tok, "The capital of France is") is first
    assert list(first) == tok("The capital of France is")["input_ids"]


def test_batched_greedy_generation_matches_single(model, tok):
    prompts = PROMPTS[:3]
    batched = generate_texts(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_texts(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    conts = generate_texts(model, tok, prompts, max_new_tokens=6, return_full_text=False)
    assert batched == [p + c for p, c in zip(prompts, conts)]


def test_one_greedy_step_is_the_argmax_token(model, tok):
    conts = generate_texts(model, tok, PROMPTS, max_new_tokens=1, batch_size=5, return_full_text=False)
    for prompt, cont in zip(PROMPTS, conts):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            nxt = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        expected = "" if nxt == tok.eos_token_id else (
            tok.decode(ids + [nxt], skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
        )
        assert cont == expected
