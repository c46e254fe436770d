"""Greedy decoding through transformers and through onnxruntime-genai on the same prompts.

Both runtimes are fed the same token ids (from the Hugging Face tokenizer and chat template), so
any difference in the generated ids comes from the models, not from tokenisation.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from pathlib import Path

PARITY_CHATS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of Spain?"},),
    ({"role": "user", "content": "Convert 5 kilometres to metres."},),
    (
        {"role": "system", "content": "You are a stand-up comedian."},
        {"role": "user", "content": "Tell me a joke about atom"},
    ),
    ({"role": "user", "content": "What is 12 times 7? Answer with a number only."},),
)


# The reference sample's request, as a chat: each model formats it with its own template.
REFERENCE_SAMPLE_CHAT: tuple[dict[str, str], ...] = PARITY_CHATS[2]


def chat_prompt_text(hf_folder: Path, messages=REFERENCE_SAMPLE_CHAT) -> str:
    """A chat formatted as prompt text by the model's own chat template, ready for the answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def chat_token_ids(hf_folder: Path, chats=PARITY_CHATS) -> list[list[int]]:
    """Token ids of each chat, formatted by the model's own chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    return [
        list(tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
        for chat in chats
    ]  # fmt: skip


def greedy_transformers(
    hf_folder: Path, prompts: list[list[int]], new_tokens: int, dtype: str = "float32",
    batch_size: int = 1,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuations from the transformers model, up to ``new_tokens`` each.

    ``dtype`` is a torch dtype's name, or ``auto`` for the stored one: float32 is the exact
    reference on CPU, and the stored bfloat16 of a large model needs half its memory.

    ``batch_size`` prompts decode together, left-padded behind an attention mask, as
    transformers batches generation. On CPU a small model's decoding reads every weight once a
    step whatever the rows, so 48 prompts in one batch decode about 5 times faster than one by one
    (SmolLM2: 14 s against 76 s). Padding changes the shapes the matmuls sum over, so a near tie
    could in principle break differently; each row ends at its first end-of-sequence token, as
    an unbatched decode stops there.
    """
    import torch
    from transformers import AutoModelForCausalLM

    loaded_as = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=loaded_as).eval()
    configured = model.generation_config.eos_token_id
    ends = set(configured if isinstance(configured, list) else [configured]) - {None}
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else min(ends, default=0)
    rows = max(batch_size, 1)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(prompts), rows):
            batch = prompts[start : start + rows]
            width = max(len(ids) for ids in batch)
            padded = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            generated = model.generate(
                padded, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                pad_token_id=pad,
            )  # fmt: skip
            outputs.extend(_through_first_end(row, ends) for row in generated[:, width:].tolist())
    return outputs


def _through_first_end(tokens: list[int], ends: set[int]) -> list[int]:
    # A finished row of a batch is filled with padding until the longest row ends.
    for position, token in enumerate(tokens):
        if token in ends:
            return tokens[: position + 1]
    return tokens


def greedy_onnx(onnx_folder: Path, prompts: list[list[int]], new_tokens: int,
                batch_size: int = 1) -> list[list[int]]:  # fmt: skip
    """Greedy continuations from onnxruntime-genai, up to ``new_tokens`` each.

    ``batch_size`` prompts (at most `GENERATOR_MAX_ROWS`) decode in one Generator, padded on the
    right with the model's own pad token, which onnxruntime-genai masks (as the served model's
    Generators decoder batches them). As in `greedy_transformers`, a float32 model on CPU reads
    every weight once a step whatever the rows, so a batch decodes several times faster (SmolLM2,
    48 prompts: 9.6 s in batches of 24 against 29.5 s one by one, the same answers). Every row
    gets ``new_tokens`` steps and ends at its first end-of-sequence token, as it does alone.
    """
    import onnxruntime_genai as og

    from llm_packager.serving.decode_loop import usable_cores
    from llm_packager.serving.generators import GENERATOR_MAX_ROWS, right_padded

    config = og.Config(str(onnx_folder))
    # The served model's thread count, not onnxruntime's default pool (every physical core).
    config.overlay(json.dumps(
        {"model": {"decoder": {"session_options": {"intra_op_num_threads": usable_cores()}}}}
    ))  # fmt: skip
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    end_tokens = {int(token) for token in tokenizer.eos_token_ids}
    pad_token = int(tokenizer.pad_token_id)
    rows = min(max(batch_size, 1), GENERATOR_MAX_ROWS)
    outputs = []
    for start in range(0, len(prompts), rows):
        batch = prompts[start : start + rows]
        padded = right_padded(batch, pad_token)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=padded.shape[1] + new_tokens, do_sample=False,
                                  batch_size=len(batch))  # fmt: skip
        generator = og.Generator(model, params)
        generator.append_tokens(padded)
        steps = []
        while not generator.is_done():
            generator.generate_next_token()
            steps.append(generator.get_next_tokens().tolist())
        answers = [list(row) for row in zip(*steps, strict=True)] if steps else [[] for _ in batch]
        outputs.extend(_through_first_end(answer, end_tokens) for answer in answers)
    return outputs


def prefix_agreement(
    reference: Sequence[Sequence[Hashable]], candidate: Sequence[Sequence[Hashable]]
) -> float:
    """Mean fraction of each reference continuation that the candidate reproduces before their
    first difference (after a difference the two continue from different contexts)."""
    fractions = []
    for expected, actual in zip(reference, candidate, strict=True):
        matched = 0
        for left, right in zip(expected, actual, strict=False):
            if left != right:
                break
            matched += 1
        fractions.append(matched / max(len(expected), len(actual), 1))
    return sum(fractions) / len(fractions)
