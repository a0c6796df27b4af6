"""Tiny random chat models for tests and benchmarks: built locally in about a second, no network.

    from tests.tinymodels import make_tiny_model
    path = make_tiny_model(tmp_path / "qwen", arch="qwen2", template="known")
    model = AutoModelForCausalLM.from_pretrained(path)

A model folder holds a 2-layer config (hidden size 32), random weights as safetensors, a byte-level
BPE tokenizer trained on a small built-in corpus, a chat template and a generation_config. Two kinds
of chat template matter to the fine-tune stage:

- template="known": one TRL ships a training variant for (Qwen2.5's ChatML for arch "qwen2",
  Llama 3's headers for arch "llama"), copied byte for byte from the installed trl so TRL
  recognises it and swaps in its `{% generation %}`-marked version.
- template="unknown": a bespoke template TRL has never seen (Llama-3-like headers with a different
  system line, and `reasoning_content` rendered as a `<think>` block), so the stage has to find the
  assistant spans by itself.

The builders are plain functions (bench/ calls them too); `tiny_model` is a pytest fixture that builds
each (arch, template) pair once per test session. `make_chat_dataset` writes a DatasetDict shaped like
`distill build`'s output (arithmetic Q/A, with and without reasoning).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

# Every special token any of the templates below needs, so one tokenizer serves them all.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# A bespoke template no library knows: headers like Llama 3's, its own default system line, and
# reasoning rendered from `reasoning_content` only when a row has some (no empty <think></think>).
UNKNOWN_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nYou are a tiny test model.<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' and message.get('reasoning_content') %}"
    "{{- '<think>\\n' + message['reasoning_content'] + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# Enough text for the BPE merges to cover chat markup, English words and arithmetic.
_CORPUS = [
    "You are a helpful assistant. You are Qwen, created by Alibaba Cloud.",
    "You are a tiny test model. Answer with the number only.",
    "What is 12 + 7? The answer is 19. What is 3 * 4? The answer is 12.",
    "<think>\nI add the two numbers: 12 + 7 = 19.\n</think>\n\n19",
    "system user assistant tool reasoning think answer question number",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "Let me think step by step. First, second, third. So the result is",
    "plus minus times divided by equals sum product difference quotient",
]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process (about a second) and keep its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return str(tok.to_str())


def make_tokenizer(dir: str | Path | None = None):  # noqa: A002 - the name the other tests use
    """A fast tokenizer (byte-level BPE, chat special tokens); saved to `dir` when given.

    EOS/BOS/PAD are left for `make_tiny_model` to set, since they depend on the chat template.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )
    if dir is not None:
        tok.save_pretrained(str(dir))
    return tok


def _template_and_tokens(arch: str, template: str) -> tuple[str, str, str | None]:
    """(chat template, end-of-turn token used as EOS, BOS token or None)."""
    if template == "unknown":
        return UNKNOWN_TEMPLATE, "<|eot_id|>", "<|begin_of_text|>"
    if template != "known":
        raise ValueError(f"template must be 'known' or 'unknown', got {template!r}")
    from trl.chat_template_utils import llama3_chat_template, qwen2_5_chat_template

    if arch == "qwen2":
        return qwen2_5_chat_template, "<|im_end|>", None
    return llama3_chat_template, "<|eot_id|>", "<|begin_of_text|>"


def make_tiny_model(path: Path, arch: str = "qwen2", template: str = "known") -> Path:
    """Write a loadable tiny causal LM folder at `path` and return it (reused if already built)."""
    path = Path(path)
    marker = path / "tiny_model.json"
    spec = {"arch": arch, "template": template}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return path
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    chat_template, eos, bos = _template_and_tokens(arch, template)
    tok = make_tokenizer()
    tok.chat_template = chat_template
    tok.eos_token = eos
    tok.pad_token = "<|endoftext|>"
    if bos is not None:
        tok.bos_token = bos
    eos_id = tok.convert_tokens_to_ids(eos)
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    bos_id = tok.convert_tokens_to_ids(bos) if bos is not None else None

    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        tie_word_embeddings=False,
    )
    config = Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=bos_id, max_new_tokens=16
    ).save_pretrained(str(path))
    marker.write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory fixture: `tiny_model(arch="qwen2", template="known")` -> a folder, built once per session."""
    root = tmp_path_factory.mktemp("tiny_models")

    def build(arch: str = "qwen2", template: str = "known") -> Path:
        return make_tiny_model(root / f"{arch}-{template}", arch=arch, template=template)

    return build


def make_chat_dataset(
    path: Path, n_train: int = 32, n_eval: int = 8, reasoning: str = "mixed", seed: int = 0
) -> Path:
    """Write a DatasetDict like `distill build`'s (splits train/eval) of arithmetic Q/A rows.

    reasoning: "none" (plain answers), "separate" (`reasoning_content` on some assistant turns),
    "inline" (`<think>...</think>` leading some answers), "mixed" (rows of all three kinds).
    Lengths vary (short answers, longer worked reasoning) as real distillation data does.
    """
    import random

    from datasets import Dataset, DatasetDict

    rng = random.Random(seed)

    def row(i: int) -> dict:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        answer = f"The answer is {a + b}."
        steps = " ".join(
            f"Step {k}: {a} plus {b}, carry and add." for k in range(rng.randint(1, 6))
        )
        kind = reasoning if reasoning != "mixed" else ("none", "separate", "inline")[i % 3]
        assistant: dict = {"role": "assistant", "content": answer}
        if kind == "separate":
            assistant["reasoning_content"] = steps
        elif kind == "inline":
            assistant["content"] = f"<think>\n{steps}\n</think>\n\n{answer}"
        messages = [{"role": "user", "content": f"What is {a} + {b}?"}, assistant]
        if i % 4 == 0:
            messages.insert(0, {"role": "system", "content": "Answer with the number."})
        return {
            "messages": messages,
            "prompt_id": f"p{i:04d}",
            "teacher": "tiny-teacher",
            "verified": (i % 5 != 0) if i % 2 else None,
            "key": f"k{i:04d}",
            "reference": str(a + b) if i % 2 else None,
        }

    rows = [row(i) for i in range(n_train + n_eval)]
    dd = DatasetDict(
        {"train": Dataset.from_list(rows[:n_train]), "eval": Dataset.from_list(rows[n_train:])}
    )
    dd.save_to_disk(str(path))
    return Path(path)
