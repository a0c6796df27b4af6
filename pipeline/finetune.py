"""Fine-tune a student on the built dataset with LoRA (or 4-bit QLoRA), sized to this machine.

    distill finetune --data data/demo/dataset --student path/to/student --out data/demo/student
    accelerate launch --config_file configs/accelerate/ddp.yaml -m pipeline finetune --config x.yaml

Reads the DatasetDict written by `distill build` (splits `train` and `eval`, a `messages` column)
and writes to OUT:

    adapter/            the LoRA adapter (PEFT) + tokenizer with the student's chat template
    config.yaml         the FinetuneConfig used
    train_report.json   steps, tokens seen, tokens/s, peak memory, final losses, chosen settings
    log_history.json    the Trainer's log history;  loss.png  train/eval loss vs step
    checkpoints/        Trainer checkpoints (for --resume);  tensorboard/  TensorBoard logs

The choices that lose people days are made here, before any step runs, and printed:

- Loss only on assistant tokens, the end-of-turn token included, for any chat template: TRL's
  training variant of the template where it has one (it adds `{% generation %}` markers), the
  template itself if it has markers, else the spans found by rendering the conversation with and
  without each assistant turn. Every training row is checked: a row with no trained token, or whose
  trained span does not end on a special end-of-turn token, stops the run with the prompt id.
- Reasoning: `reasoning_content` is rendered by the template when it can, else folded into the
  answer as `<think>...</think>`; an empty `<think></think>` that a template adds to a row without
  reasoning is left out of the loss.
- Packing (best-fit, sequences kept apart by position ids) when a probe shows the student's
  attention keeps packed sequences apart; padded batches otherwise.
- Device, precision, 4-bit, batch, accumulation and activation checkpointing from
  pipeline/hardware.py; every one can be set by hand.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipeline.config import StageConfig, dump_config
from pipeline.errors import ConfigError, InputError, TrainingError


class FinetuneConfig(StageConfig):
    """The `finetune:` section of a config file; every key is also a flag (dashes for underscores)."""

    data: str | None = Field(None, description="Dataset folder written by `distill build`.")
    student: str | None = Field(
        None, description="Student model: a local folder, or a hub id where the hub is reachable."
    )
    out: str | None = Field(None, description="Output folder for the adapter, report and logs.")
    max_steps: int | None = Field(
        None, description="Stop after this many optimizer steps (overrides epochs when set)."
    )
    epochs: float = Field(2.0, gt=0, description="Passes over the training split.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: str = Field("cosine", description="Learning-rate schedule (transformers name).")
    warmup: float = Field(
        0.03, ge=0, description="Warmup: a fraction of the steps if < 1, else a number of steps."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lora_r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha/r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' or a list of names (q_proj, ...).",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA) instead of LoRA.")
    batch_size: int | None = Field(
        None, gt=0, description="Sequences per device per step; auto-fit to memory when unset."
    )
    grad_accum: int | None = Field(
        None, gt=0, description="Gradient accumulation steps; unset: effective_batch_size / batch."
    )
    effective_batch_size: int = Field(
        16, gt=0, description="Target sequences per optimizer step over all devices (auto-fit)."
    )
    max_length: int = Field(
        1024, gt=0, description="Longest tokenized row; with packing, the packed row length."
    )
    quantize: Literal["auto", "4bit", "none"] = Field(
        "auto",
        description="4bit: QLoRA (CUDA + bitsandbytes); auto: 4-bit only if 16-bit won't fit.",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Training precision; auto: bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train; auto: CUDA when a GPU is visible."
    )
    gradient_checkpointing: bool | None = Field(
        None, description="Activation checkpointing; auto: only when the batch would not fit."
    )
    packing: bool | None = Field(
        None,
        description="Pack rows into max_length blocks; auto: on when attention keeps them apart.",
    )
    attn_implementation: str = Field(
        "sdpa", description="Attention kernel: sdpa, eager, flash_attention_2, ..."
    )
    eval_steps: int = Field(50, gt=0, description="Evaluate on the eval split every N steps.")
    save_steps: int = Field(100, gt=0, description="Save a checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept (oldest deleted).")
    logging_steps: int = Field(10, gt=0, description="Log the train loss every N steps.")
    report_to: str | None = Field(
        None,
        description="Trainer loggers: tensorboard, wandb, none; unset: tensorboard if installed.",
    )
    resume: bool = Field(False, description="Continue from the last checkpoint in OUT/checkpoints.")
    seed: int = Field(42, description="Seed for adapter init, shuffling and dropout.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the student (only for students you trust)."
    )


# ---------------------------------------------------------------------------------------------
# Inputs


def load_dataset_dir(path: str) -> Any:
    """The DatasetDict from `distill build`, checked for what training needs."""
    from datasets import DatasetDict, load_from_disk

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: dataset folder not found; run `distill build` first or fix --data")
    try:
        ds = load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError/ValueError for foreign folders
        raise InputError(
            f"{p}: not a dataset saved by `distill build` ({type(e).__name__}); point --data at "
            "the build output"
        ) from None
    if not isinstance(ds, DatasetDict) or "train" not in ds:
        raise InputError(
            f"{p}: expected splits 'train' and 'eval'; rebuild it with `distill build`"
        )
    if "messages" not in ds["train"].column_names:
        cols = ", ".join(ds["train"].column_names)
        raise InputError(
            f"{p}: the train split has no 'messages' column (it has: {cols}); "
            "point --data at the output of `distill build`"
        )
    if len(ds["train"]) == 0:
        raise InputError(f"{p}: the train split is empty; harvest and build more rows")
    return ds


def resolve_student(student: str, trust_remote_code: bool) -> Any:
    """Load the student's config (no weights) from a folder or the hub; errors say what to do."""
    from transformers import AutoConfig

    p = Path(student).expanduser()
    # "org/name" is a hub id unless "org" is a local folder (then it is a path that is missing).
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", student) is not None
    hub_id = hub_id and not p.parent.is_dir()
    if not p.exists() and not hub_id:
        raise InputError(
            f"student path {student} does not exist; pass a model folder or a hub id (org/name)"
        )
    try:
        return AutoConfig.from_pretrained(
            str(p) if p.exists() else student, trust_remote_code=trust_remote_code
        )
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(
                f"student {student} ships its own model code; set trust_remote_code: true "
                "(--trust-remote-code) only if you trust it"
            ) from None
        raise InputError(f"student {student}: not a model ({str(e).splitlines()[0]})") from None
    except OSError as e:
        where = "folder" if p.exists() else "hub id"
        raise InputError(
            f"student {where} {student} cannot be loaded ({str(e).splitlines()[0][:120]}); "
            "pass a local folder with config.json and weights, or download it first"
        ) from None


# ---------------------------------------------------------------------------------------------
# Chat template: which tokens carry the loss


def training_template(tokenizer) -> tuple[str, str]:
    """(template to render training rows with, how assistant tokens are found).

    "markers": the template has `{% generation %}` markers (TRL's training variant or its own).
    "rendering": spans found by rendering each conversation prefix (any template).
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise InputError(
            "the student's tokenizer has no chat template; use an instruct/chat model, or add a "
            "chat_template to its tokenizer_config.json"
        )
    try:
        patched = get_training_chat_template(tokenizer)
    except ValueError:  # TRL has no training variant of this template
        patched = None
    except Exception:  # a template that breaks TRL's tool-calling probes
        patched = None
    if patched is not None:
        return patched, "markers"
    if has_generation_markers(template):
        return template, "markers"
    return template, "rendering"


def renders_reasoning(tokenizer, template: str) -> bool:
    """Does the template render an assistant turn's `reasoning_content`?"""
    probe = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "zq7reasoningprobe"},
    ]
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception:
        return False
    return "zq7reasoningprobe" in text


def prepare_messages(messages: list[dict], native_reasoning: bool) -> tuple[list[dict], bool]:
    """Clean one row's messages for the template; returns (messages, row has reasoning).

    Arrow gives every message every key (None where absent), so None keys are dropped. Reasoning in
    `reasoning_content` stays there if the template renders it, else becomes an inline `<think>`.
    """
    out: list[dict] = []
    has_reasoning = False
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = m.pop("reasoning_content", "") or ""
        if m.get("role") == "assistant":
            if "<think>" in (m.get("content") or ""):
                has_reasoning = True
            if reasoning.strip():
                has_reasoning = True
                if native_reasoning:
                    m["reasoning_content"] = reasoning
                else:
                    m["content"] = (
                        f"<think>\n{reasoning.strip()}\n</think>\n\n{m.get('content', '')}"
                    )
        out.append(m)
    return out, has_reasoning


def _spans_by_rendering(tokenizer, template: str, messages: list[dict], full: str) -> list:
    """Character spans of each assistant turn: render the turn's prefix with a generation prompt,
    then through the turn; what the turn adds (its text and end-of-turn markup) is its span."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(
            messages[:i], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        through = tokenizer.apply_chat_template(
            messages[: i + 1], chat_template=template, tokenize=False
        )
        # A template that renders earlier turns differently once later ones exist (some drop
        # old reasoning) breaks the prefix property; that turn is then not trained on.
        if through.startswith(before) and full.startswith(through):
            spans.append((len(before), len(through)))
    return spans


EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")


def tokenize_row(
    tokenizer, template: str, how: str, messages: list[dict], has_reasoning: bool
) -> dict[str, list[int]]:
    """input_ids and labels (-100 where no loss) for one conversation."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if how == "markers":
        out = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        if list(out["input_ids"]) != list(ids):  # cannot happen with a fast tokenizer; be sure
            raise TrainingError("chat template tokenization is not reproducible; report this bug")
        mask = [bool(x) for x in out["assistant_masks"]]
    else:
        spans = _spans_by_rendering(tokenizer, template, messages, text)
        mask = [any(s < b and e > a for a, b in spans) for s, e in offsets]
    if not has_reasoning:
        # Templates of reasoning models add an empty <think></think> to answers without reasoning;
        # training on it would teach the student to skip thinking, so it carries no loss.
        for m in EMPTY_THINK.finditer(text):
            mask = [k and not (m.start() <= s < m.end()) for k, (s, _e) in zip(mask, offsets)]
    labels = [t if k else -100 for t, k in zip(ids, mask)]
    return {"input_ids": list(ids), "labels": labels}


def end_of_turn_ids(tokenizer) -> set[int]:
    """Tokens that can end a turn: the added (special) vocabulary and EOS."""
    ids = set(tokenizer.get_added_vocab().values())
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def check_masks(rows: list[dict], tokenizer, prompt_ids: list[str], student: str) -> int:
    """Stop before training if a row trains on nothing or its trained span does not end on an
    end-of-turn token (the student would never learn to stop). Returns the end-of-turn token id."""
    eot = end_of_turn_ids(tokenizer)
    seen: dict[int, int] = {}
    for row, pid in zip(rows, prompt_ids):
        trained = [t for t in row["labels"] if t != -100]
        if not trained:
            raise TrainingError(
                f"chat template of {student} gives prompt {pid} no assistant tokens to train on "
                "(empty loss mask); add {% generation %}...{% endgeneration %} around the "
                "assistant turn in its chat_template"
            )
        last = next((t for t in reversed(trained) if tokenizer.decode([t]).strip()), trained[-1])
        if last not in eot:
            raise TrainingError(
                f"chat template of {student}: the trained span of prompt {pid} ends on "
                f"{tokenizer.decode([last])!r}, not on an end-of-turn token, so the student would "
                "never learn to stop; fix the template so the assistant turn ends with its "
                "end-of-turn token"
            )
        seen[last] = seen.get(last, 0) + 1
    return max(seen, key=lambda k: seen[k])


def tokenize_split(split, tokenizer, template: str, how: str, native_reasoning: bool):
    from jinja2 import TemplateError

    rows, pids = [], []
    for i, ex in enumerate(split):
        pid = str(ex.get("prompt_id") or f"row {i}")
        msgs, has_r = prepare_messages(ex["messages"], native_reasoning)
        try:
            rows.append(tokenize_row(tokenizer, template, how, msgs, has_r))
        except TemplateError as e:  # e.g. a template that refuses a system turn
            raise InputError(
                f"the student's chat template rejects prompt {pid}: {e}; rebuild the dataset "
                "to fit it (e.g. `distill build --drop-system`) or use another student"
            ) from None
        pids.append(pid)
    return rows, pids


# ---------------------------------------------------------------------------------------------
# Model


def packing_keeps_sequences_apart(model) -> bool:
    """Run two sequences packed in one row (position ids restarting, no attention mask) and alone:
    the second one's logits must not change, or the attention leaks across packed sequences."""
    import torch

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    a = torch.randint(0, vocab, (9,), generator=g)
    b = torch.randint(0, vocab, (7,), generator=g)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # use_cache=False as in training: with a cache, transformers ignores packed positions.
            alone = model(input_ids=b[None].to(device), use_cache=False).logits[0].float()
            packed_ids = torch.cat([a, b])[None].to(device)
            pos = torch.cat([torch.arange(9), torch.arange(7)])[None].to(device)
            packed = model(input_ids=packed_ids, position_ids=pos, use_cache=False).logits[0, 9:]
            packed = packed.float()
    except Exception:  # an attention kernel that refuses position-id packing
        return False
    finally:
        model.train(was_training)
    # fp32 agrees to rounding; half precision kernels differ a little by sequence length.
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    return bool((packed - alone).abs().max() <= tol * alone.abs().max().clamp(min=1e-6))


# Kernels that take a flattened batch with sequence boundaries (cu_seq_lens) at linear cost.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def packed_rows_collator(pad_token_id: int):
    """Batches of packed rows, each row kept apart and its sequences marked by position ids.

    TRL's default for packing flattens the whole batch into one row (padding-free), which only
    varlen kernels (flash attention) run at linear cost; sdpa and eager then build one mask over
    batch x max_length tokens, quadratic in the batch. Here each packed row keeps its own
    block-diagonal mask (transformers derives it from position ids when there is no attention
    mask), so attention costs batch x max_length^2.
    """
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    base = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, return_position_ids=True)

    def collate(examples: list[dict]) -> dict:
        batch = base(examples)
        del batch["attention_mask"]  # with a mask, transformers would ignore the position ids
        batch["labels"][batch["position_ids"] == 0] = -100  # never predict across a boundary
        return batch

    return collate


def load_student(
    student: str, cfg: FinetuneConfig, dtype: str, quantize: bool, checkpointing: bool
):
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "attn_implementation": cfg.attn_implementation,
    }
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_quant_storage=torch_dtype,  # lets FSDP shard the 4-bit weights
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(student, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(
            f"student {student}: cannot load weights ({str(e).splitlines()[0][:160]})"
        ) from None
    if quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return model


# ---------------------------------------------------------------------------------------------
# Outputs


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    ev = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if ev:
        ax.plot(*zip(*ev), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_memory() -> tuple[int, str]:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


# ---------------------------------------------------------------------------------------------
# The stage


def finetune(cfg: FinetuneConfig) -> Path:
    """Train a LoRA adapter on `cfg.data` for `cfg.student`; returns the output folder."""
    from pipeline import hardware

    if not cfg.data:
        raise ConfigError("no dataset: pass --data DIR (from `distill build`) or set finetune.data")
    if not cfg.student:
        raise ConfigError(
            "no student: pass --student MODEL (a folder or hub id) or set finetune.student"
        )
    if not cfg.out:
        raise ConfigError("no output folder: pass --out DIR or set finetune.out")
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    started = time.time()
    main_process = int(os.environ.get("RANK", "0")) == 0

    def say(msg: str) -> None:
        if main_process:
            print(msg, flush=True)

    # 1. Check every input before loading anything heavy.
    from transformers.trainer_utils import get_last_checkpoint

    last_ckpt = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if cfg.resume and last_ckpt is None:
        raise ConfigError(f"--resume: no checkpoint under {ckpt_dir}; run without --resume")
    if not cfg.resume and (last_ckpt is not None or (out / "adapter").exists()):
        raise ConfigError(
            f"{out} already holds a training run; pass --resume to continue it, or another --out"
        )
    ds = load_dataset_dir(cfg.data)
    model_config = resolve_student(cfg.student, cfg.trust_remote_code)
    shape = hardware.model_shape(model_config, cfg.lora_target_modules)
    if not shape.lora_shapes:
        raise ConfigError(
            f"lora_target_modules {cfg.lora_target_modules!r} matches no linear layer of "
            f"{cfg.student}; use 'all-linear' or names such as q_proj, v_proj"
        )

    # 2. Hardware and the settings that fit it.
    hw = hardware.detect_hardware()
    if cfg.device == "cpu" and hw.device != "cpu":
        hw = hardware.Hardware(
            device="cpu", name="CPU", cpu_memory_bytes=hw.cpu_memory_bytes, world_size=hw.world_size
        )
    elif cfg.device == "cuda" and hw.device != "cuda":
        raise ConfigError("device cuda asked, but no CUDA GPU is visible; use --device auto or cpu")
    if hw.device == "cuda" and hw.gpu_count > 1 and hw.world_size == 1:
        raise ConfigError(
            f"{hw.gpu_count} GPUs visible to one process; launch with `accelerate launch "
            "--config_file configs/accelerate/ddp.yaml -m pipeline finetune ...` or set "
            "CUDA_VISIBLE_DEVICES=0"
        )
    try:
        plan = hardware.plan_training(
            hw,
            shape,
            seq_len=cfg.max_length,
            lora_r=cfg.lora_r,
            target_batch=cfg.effective_batch_size,
            dtype=cfg.dtype,
            quantize=cfg.quantize,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
    except hardware.PlanError as e:
        raise ConfigError(str(e)) from None
    say(f"distill finetune: {cfg.student} on {cfg.data} -> {out}")
    say(f"hardware: {hw.describe()}")
    say(plan.describe())

    # 3. Tokenize with the loss mask, and check it on every row before training.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.student, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(
            f"student {cfg.student}: cannot load its tokenizer ({str(e).splitlines()[0][:160]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding carries no loss (labels -100)
    template, how = training_template(tokenizer)
    native_reasoning = renders_reasoning(tokenizer, template)
    train_rows, train_pids = tokenize_split(ds["train"], tokenizer, template, how, native_reasoning)
    eot_id = check_masks(train_rows, tokenizer, train_pids, cfg.student)
    eval_rows: list[dict] = []
    if "eval" in ds and len(ds["eval"]) > 0:
        eval_rows, eval_pids = tokenize_split(
            ds["eval"], tokenizer, template, how, native_reasoning
        )
        check_masks(eval_rows, tokenizer, eval_pids, cfg.student)
    too_long = sum(len(r["input_ids"]) > cfg.max_length for r in train_rows)
    label_tokens = sum(sum(t != -100 for t in r["labels"]) for r in train_rows)

    # 4. The student, and whether packing is safe with its attention.
    model = load_student(cfg.student, cfg, plan.dtype, plan.quantize, plan.gradient_checkpointing)
    if cfg.packing is None and plan.world_size > 1:
        # Under FSDP/ZeRO-3 some ranks hold no weights yet, so no probe: every rank must decide
        # alike, from the kernel's name (these derive packed masks from position ids).
        packing = cfg.attn_implementation in ("sdpa", "eager", "flex_attention", *VARLEN_ATTENTION)
        packing_why = f"{cfg.attn_implementation} attention " + (
            "keeps packed sequences apart" if packing else "is not known to keep sequences apart"
        )
    elif cfg.packing is None:
        packing = packing_keeps_sequences_apart(model)
        packing_why = (
            "packed sequences stay apart" if packing else "attention leaks across packed sequences"
        )
    else:
        packing, packing_why = cfg.packing, "set in config"

    stop_ids = model.generation_config.eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or [])
    if eot_id not in stop_ids:
        # The template ends turns with a token generation would not stop at (LLaMA-Factory #7943):
        # the adapter's generation_config adds it.
        model.generation_config.eos_token_id = [eot_id, *stop_ids]

    say(
        f"  - packing {'on' if packing else 'off'}: {packing_why}; loss mask by "
        + ("template {% generation %} markers" if how == "markers" else "template rendering")
        + f", end-of-turn token {tokenizer.decode([eot_id])!r} trained"
        + ("; reasoning_content rendered by the template" if native_reasoning else "")
    )
    say(
        f"data: {len(train_rows)} train rows ({label_tokens} trained tokens), {len(eval_rows)} eval "
        f"rows; {too_long} train rows longer than max_length {cfg.max_length} are truncated"
    )

    # 5. Train.
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    report_to = cfg.report_to
    if report_to is None:
        try:
            import tensorboard  # noqa: F401

            report_to = "tensorboard"
        except ImportError:
            report_to = "none"
    # TensorBoard's callback reads its folder from the environment only; a user's value wins.
    tb_dir_set = "tensorboard" in report_to and "TENSORBOARD_LOGGING_DIR" not in os.environ
    if tb_dir_set:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")

    train_ds = Dataset.from_list(train_rows)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    # Varlen kernels take TRL's own packing (one flattened row per batch); other kernels get rows
    # packed here and batched row by row (see packed_rows_collator). TRL refuses a custom collator
    # together with its packing, hence packing the dataset before handing it over.
    trl_packing = packing and cfg.attn_implementation in VARLEN_ATTENTION
    collator = None
    if packing and not trl_packing:
        from trl.data_utils import pack_dataset

        # Blocks no longer than the longest row: these kernels compute every block's full
        # block x block score matrix, so a longer block only adds masked-out work.
        block = min(cfg.max_length, max(len(r["input_ids"]) for r in train_rows))
        train_ds = pack_dataset(train_ds, block, "bfd")
        eval_ds = pack_dataset(eval_ds, block, "bfd") if eval_ds is not None else None
        collator = packed_rows_collator(tokenizer.pad_token_id)
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=cfg.max_steps if cfg.max_steps is not None else -1,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        gradient_checkpointing=plan.gradient_checkpointing,
        bf16=plan.dtype == "bf16",
        fp16=plan.dtype == "fp16",
        use_cpu=plan.device == "cpu",
        max_length=cfg.max_length,
        packing=trl_packing,
        packing_strategy="bfd",
        assistant_only_loss=False,  # the labels above already hold the mask
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        report_to=report_to,
        seed=cfg.seed,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not main_process,
    )
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        # PEFT reads a plain string as a regex over full module names; a name means a list of one.
        target_modules=(
            [cfg.lora_target_modules]
            if isinstance(cfg.lora_target_modules, str) and cfg.lora_target_modules != "all-linear"
            else cfg.lora_target_modules
        ),
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
    )
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    trainer = SFTTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora,
    )
    train_started = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=last_ckpt if cfg.resume else None)
    finally:
        if tb_dir_set:
            del os.environ["TENSORBOARD_LOGGING_DIR"]
    train_time = time.time() - train_started
    # The held-out loss at the last step: reuse it when the schedule already evaluated there.
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_ds is None:
        final_eval: dict[str, Any] = {}
    elif evals and evals[-1].get("step") == trainer.state.global_step:
        final_eval = evals[-1]
    else:
        final_eval = trainer.evaluate()

    # 6. Save: adapter + tokenizer (the student's own template) + generation config, report, plots.
    trainer.save_model(str(out / "adapter"))
    if not trainer.is_world_process_zero():
        return out
    model.generation_config.save_pretrained(str(out / "adapter"))
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    plot_loss(history, out / "loss.png")
    train_losses = [e["loss"] for e in history if "loss" in e]
    tokens_seen = int(trainer.state.num_input_tokens_seen)
    peak, peak_kind = peak_memory()
    report = {
        "student": cfg.student,
        "data": cfg.data,
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "tokens_seen": tokens_seen,
        "train_tokens_per_s": round(tokens_seen / train_time, 2) if train_time > 0 else None,
        "train_label_tokens_per_epoch": label_tokens,
        "train_runtime_s": round(float(result.metrics.get("train_runtime", train_time)), 3),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "estimated_memory_bytes": plan.estimate.total,
        "final_train_loss": train_losses[-1] if train_losses else result.training_loss,
        "mean_train_loss": result.training_loss,
        "final_eval_loss": final_eval.get("eval_loss"),
        "wall_time_s": round(time.time() - started, 3),
        "resumed_from": last_ckpt if cfg.resume else None,
        "settings": {
            "device": plan.device,
            "hardware": hw.describe(),
            "dtype": plan.dtype,
            "quantize": "4bit" if plan.quantize else "none",
            "batch_size": plan.batch_size,
            "grad_accum": plan.grad_accum,
            "world_size": plan.world_size,
            "effective_batch_size": plan.effective_batch,
            "packing": packing,
            "gradient_checkpointing": plan.gradient_checkpointing,
            "loss_mask": how,
            "end_of_turn_token": tokenizer.decode([eot_id]),
            "reasoning": "reasoning_content" if native_reasoning else "inline <think>",
            "reasons": list(plan.reasons) + [f"packing: {packing_why}"],
        },
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    eval_txt = f"{report['final_eval_loss']:.4f}" if report["final_eval_loss"] is not None else "-"
    say(
        f"done: {report['steps']} steps, {tokens_seen} tokens "
        f"({report['train_tokens_per_s']} tok/s), final train loss "
        f"{report['final_train_loss']:.4f}, eval loss {eval_txt}; adapter in {out / 'adapter'}"
    )
    final_loss = float(train_losses[-1] if train_losses else result.training_loss)
    if not math.isfinite(final_loss):
        raise TrainingError(f"training loss is {final_loss}; lower --lr or use --dtype fp32/bf16")
    return out
