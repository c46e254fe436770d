"""A tiny random-weight Phi-3 with a locally trained tokenizer, for running every path offline.

The model is a real `Phi3ForCausalLM` (so transformers, MLflow and the onnxruntime-genai model
builder treat it exactly like Phi-3-mini), but its weights are random: any quality figure measured
on it is meaningless. The tokenizer is a byte-level BPE (GPT-2 style), because onnxruntime-genai
encodes and decodes that kind exactly as transformers does, so the two runtimes can be compared
token for token; a byte-fallback BPE would not (docs/models.md, "The tiny model").
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from llm_packager.errors import InvalidParametersError

# Phi-3's own special tokens, in Phi-3's order, so prompts look the same as for the real model.
UNKNOWN_TOKEN = "<unk>"
BEGIN_TOKEN = "<s>"
END_OF_TEXT_TOKEN = "<|endoftext|>"
END_OF_TURN_TOKEN = "<|end|>"
SPECIAL_TOKENS = (
    UNKNOWN_TOKEN,
    BEGIN_TOKEN,
    "</s>",
    END_OF_TEXT_TOKEN,
    "<|assistant|>",
    "<|system|>",
    END_OF_TURN_TOKEN,
    "<|user|>",
)
# Phi-3-mini-4k-instruct's chat template, written out here so the synthetic model formats
# conversations exactly as the real one does.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


MODEL_CARD = """---
license: apache-2.0
tags:
- synthetic
- random-weights
---
# Synthetic tiny Phi-3 (random weights)

A `Phi3ForCausalLM` with random weights and a locally trained byte-level BPE tokenizer, built by
llm-packager to run every code path offline. Its answers are noise. Sizes: {spec}
"""


# The dtypes a synthetic model can be stored in.
STORED_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class SyntheticPhi3Spec:
    """Sizes of the synthetic model. `max_position_embeddings` doubles as the original context
    length, because the onnxruntime-genai builder takes Phi-3's plain (non-LongRoPE) path only
    when the two are equal."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    seed: int
    # As stored on disk; Phi-3-mini's weights are bfloat16, which halves what loads them.
    weights_dtype: str = "float32"

    def validate(self) -> None:
        """Raise ValueError naming the first size that cannot make a Phi-3."""
        if self.weights_dtype not in STORED_DTYPES:
            raise InvalidParametersError(
                f"synthetic model: weights_dtype must be one of {', '.join(STORED_DTYPES)}, got "
                f"{self.weights_dtype!r}"
            )
        for name, value in vars(self).items():
            if name not in ("seed", "weights_dtype") and value < 1:
                raise InvalidParametersError(
                    f"synthetic model: {name} must be a positive integer, got {value}"
                )
        if self.vocab_size < len(SPECIAL_TOKENS) + 256:
            raise InvalidParametersError(
                f"synthetic model: vocab_size must be at least {len(SPECIAL_TOKENS) + 256} "
                f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {self.vocab_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise InvalidParametersError(
                f"synthetic model: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise InvalidParametersError(
                f"synthetic model: num_attention_heads ({self.num_attention_heads}) must be "
                f"divisible by num_key_value_heads ({self.num_key_value_heads})"
            )


def _training_corpus() -> list[str]:
    # Deterministic English-like text in the shape of chat prompts and answers, so the learnt
    # merges cover the words the evaluation set uses; bytes outside it still encode through the
    # 256-byte alphabet, so no input is ever unknown.
    # fmt: off
    subjects = ["The capital of Spain", "The capital of France", "The answer", "A kilometre",
                "Water", "The result", "An atom", "The model", "Python", "A transformer"]
    verbs = ["is", "was", "equals", "contains", "means", "becomes"]
    objects = ["Madrid.", "Paris.", "four.", "1000 metres.", "H2O.", "a small particle.",
               "twelve.", "a language.", "a neural network.", "the smallest unit of matter."]
    questions = ["What is the capital of {}?", "How many {} are in a mile?",
                 "Define {} in one line.", "Convert 5 {} to metres.", "What is 12 times {}?",
                 "Tell me a joke about {}."]
    fillers = ["Spain", "Italy", "Japan", "feet", "inches", "gravity", "entropy", "3", "7", "atoms"]
    sentences = [" ".join(parts) for parts in itertools.product(subjects, verbs, objects)]
    sentences += [q.format(f) for q, f in itertools.product(questions, fillers)]
    sentences += [" ".join(str(number) for number in range(start, start + 50))
                  for start in range(0, 2000, 50)]
    # Seeded pseudo-words give BPE enough distinct merges to fill any vocabulary size we use, so
    # every id the model can emit is a real token that both runtimes decode the same way.
    generator = random.Random(20240501)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - rank for rank in range(len(letters))]
    for _ in range(4000):
        words = ["".join(generator.choices(letters, weights, k=generator.randint(2, 9)))
                 for _ in range(12)]
        sentences.append(" ".join(words).capitalize() + ".")
    # fmt: on
    return sentences


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE with Phi-3's special tokens and chat template.

    Returns:
        A `transformers.PreTrainedTokenizerFast` ready for `save_pretrained`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise InvalidParametersError(
            f"synthetic tokenizer learnt {tokenizer.get_vocab_size()} tokens, not {vocab_size}; "
            "the training text is too small for this vocab_size"
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BEGIN_TOKEN,
        eos_token=END_OF_TEXT_TOKEN,
        unk_token=UNKNOWN_TOKEN,
        pad_token=END_OF_TEXT_TOKEN,
        additional_special_tokens=[token for token in SPECIAL_TOKENS if token.startswith("<|")],
        # Space clean-up is meant for WordPiece; on a byte-level BPE it would drop real spaces
        # (and transformers warns about it on every load).
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = PHI3_CHAT_TEMPLATE
    return fast


def build_synthetic_phi3(spec: SyntheticPhi3Spec, destination: Path) -> Path:
    """Write a random-weight `Phi3ForCausalLM` and its tokenizer in Hugging Face layout.

    The same spec always gives byte-identical weights (the seed fixes torch's initialisation).

    Returns:
        The destination folder.
    """
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    spec.validate()
    tokenizer = build_tokenizer(spec.vocab_size)
    token_id = tokenizer.convert_tokens_to_ids
    config = Phi3Config(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        original_max_position_embeddings=spec.max_position_embeddings,
        rope_scaling=None,
        bos_token_id=token_id(BEGIN_TOKEN),
        eos_token_id=token_id(END_OF_TEXT_TOKEN),
        pad_token_id=token_id(END_OF_TEXT_TOKEN),
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = Phi3ForCausalLM(config).eval().to(getattr(torch, spec.weights_dtype))
    # Like Phi-3-mini, stop generating at the end of a turn as well as at end of text.
    model.generation_config = GenerationConfig(
        bos_token_id=token_id(BEGIN_TOKEN),
        eos_token_id=[token_id(END_OF_TEXT_TOKEN), token_id(END_OF_TURN_TOKEN)],
        pad_token_id=token_id(END_OF_TEXT_TOKEN),
    )
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination, safe_serialization=True)
    tokenizer.save_pretrained(destination)
    (destination / "synthetic_spec.json").write_text(json.dumps(vars(spec), indent=2) + "\n")
    # A model card, as a Hub model has, so the logged models carry a description and a license
    # instead of MLflow looking for them on the Hub.
    (destination / "README.md").write_text(MODEL_CARD.format(spec=json.dumps(vars(spec))))
    return destination
