"""A tiny random LLaMA and a byte-level BPE tokenizer built in-process, for tests and offline smoke runs.

Nothing is downloaded: the tokenizer is trained on a few sentences in milliseconds and the model is
randomly initialised from a seed, so scores are deterministic but meaningless.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["TINY_CORPUS", "random_model_like", "tiny_llama", "tiny_tokenizer"]

TINY_CORPUS: tuple[str, ...] = (
    "The mother tongue of Danielle Darrieux is French.",
    "The capital of France is Paris and the capital of Italy is Rome.",
    "Review : a great and moving film\nSentiment : positive",
    "Review : a dull and boring mess\nSentiment : negative",
    "Is this sentence linguistically acceptable? Answer: Yes No",
    "question: Paris is in France. True or False?\nanswer: True False",
    "Question: Which is a fruit?\n(A) apple\n(B) car\n(C) rock\n(D) sky\nAnswer: A B C D",
    "English is spoken in England. Microsoft developed Windows. nq question: who wrote it",
    # label words repeated so that " Yes", " No", " True", " False", " positive", " negative" are single tokens
    "Answer: Yes\nAnswer: No\nanswer: True\nanswer: False\nSentiment : positive\nSentiment : negative\n" * 3,
)


def tiny_tokenizer(add_bos: bool = True, padding_side: str = "right", corpus: Sequence[str] = TINY_CORPUS):
    """GPT-2-style byte-level BPE (``<pad>``=0, ``<s>``=1, ``</s>``=2) wrapped as a PreTrainedTokenizerFast.

    ``add_bos`` makes it prepend ``<s>`` like LLaMA tokenizers do; otherwise it adds nothing, like GPT-2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(corpus), trainer=trainer)
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama(vocab_size: int, seed: int = 0, max_position_embeddings: int = 512,
               num_hidden_layers: int = 2) -> torch.nn.Module:
    """Randomly initialised LLaMA (2 layers by default, hidden 32, 4 heads, 2 KV heads) in eval mode, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def random_model_like(source, target, seed: int = 0):
    """A causal LM with ``source``'s config and tokenizer but random weights, saved (fp32) to ``target``.

    ``source`` needs only ``config.json`` and the tokenizer files (no weights). Used where a model's shape
    matters but its weights cannot be had, e.g. timing a run of SmolLM2-135M's shape on a machine the GGUF
    cannot reach. Returns ``target``.
    """
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, target = Path(source), Path(target)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def save_tiny_llama(directory, **config):
    """The tiny random LLaMA (``config``: ``tiny_llama``'s arguments) and its tokenizer saved as a local model
    directory, as easyeditor loads one; returns ``directory``."""
    tok = tiny_tokenizer(add_bos=False)
    tok.unk_token = "<pad>"  # easyeditor's FT masks targets with `!= tok.unk_token_id`
    tiny_llama(vocab_size=len(tok), seed=0, **config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
