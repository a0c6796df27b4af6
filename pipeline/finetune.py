"""Fine-tune a student on the built dataset with LoRA (or 4-bit QLoRA), sized to this machine.

    distill finetune --data data/demo/dataset --student path/to/student --out data/demo/student
    accelerate launch --config_file configs/accelerate/ddp.yaml -m pipeline finetune --config x.yaml

Reads the DatasetDict written by `distill build` (splits `train` and `eval`, a `messages` column)
and writes to OUT:

    adapter/            the LoRA adapter (PEFT) + tokenizer with the student's chat template
    config.yaml         the FinetuneConfig used
    plan.json           the settings as resolved (batch, precision, schedule); --resume reuses them
    train_report.json   steps, tokens seen, tokens/s, peak memory, final losses, chosen settings
    log_history.json    the Trainer's log history;  loss.png  train/eval loss vs step
    checkpoints/        Trainer checkpoints (for --resume);  tensorboard/  TensorBoard logs

The choices that lose people days are made here, before any step runs, and printed:

- Loss only on assistant tokens, the end-of-turn token included, for any chat template (chat.py): TRL's
  training variant of the template where it has one (it adds `{% generation %}` markers), the
  template itself if it has markers, else the spans found by rendering the conversation with and
  without each assistant turn. Every training row is checked: a row with no trained token, or whose
  trained span does not end on a special end-of-turn token, stops the run with the prompt id.
  Only the last assistant turn (the teacher's answer) is trained unless `train_on: all`: the
  earlier turns of a multi-turn prompt were written by the prompt's author, not the teacher.
- Reasoning: `reasoning_content` is rendered by the template when it can, else folded into the
  answer as `<think>...</think>`; an empty `<think></think>` that a template adds to a turn without
  reasoning is left out of the loss (decided turn by turn).
- Packing (best-fit, sequences kept apart by position ids) when a probe shows the student's
  attention keeps packed sequences apart; padded batches otherwise.
- Device, precision, 4-bit, batch, accumulation and activation checkpointing from
  pipeline/hardware.py; every one can be set by hand.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from datasets import Dataset
from pydantic import Field
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from pipeline import hardware, kd
from pipeline.artifacts import dataset_record, read_build_report, read_dataset, student_path
from pipeline.chat import check_masks, renders_reasoning, tokenize_split, training_template
from pipeline.config import StageConfig, dump_config
from pipeline.errors import ConfigError, InputError, TrainingError
from pipeline.outdir import claim
from pipeline.plots import plot_loss_curves


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
    train_on: Literal["last", "all"] = Field(
        "last", description="Assistant turns that carry loss: last (the teacher's answer) or all."
    )
    resume: bool = Field(False, description="Continue from the last checkpoint in OUT/checkpoints.")
    seed: int = Field(42, description="Seed for adapter init, shuffling and dropout.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the student (only for students you trust)."
    )
    loss: Literal["sft", "kd"] = Field(
        "sft",
        description="sft: cross-entropy on the teacher's tokens; kd: mixed with forward KL to the teacher's top-k logprobs (a dataset built with --tokenizer from a --logprobs harvest).",
    )
    kd_alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the KD term: alpha * KL + (1 - alpha) * CE."
    )
    kd_temperature: float = Field(
        1.0, gt=0, description="Divides the student's logits in the KD term (keep 1: see docs)."
    )
    kd_tail: bool = Field(
        True,
        description="KD with one tail bucket for the mass outside the teacher's top-k (else both renormalized over the top-k).",
    )


# -- Inputs ----------------------------------------------------------------------------------------


def resolve_student(student: str, trust_remote_code: bool) -> Any:
    """Load the student's config (no weights) from a folder or the hub; errors say what to do."""
    p = Path(student).expanduser()
    # "org/name" is a hub id unless "org" is a local folder (then it is a path that is missing).
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", student) and not p.parent.is_dir()
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


# -- Model -----------------------------------------------------------------------------------------


def packing_keeps_sequences_apart(model) -> bool:
    """Run two sequences packed in one row (position ids restarting, no attention mask) and alone:
    the second one's logits must not change, or the attention leaks across packed sequences."""
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
    except Exception:  # an attention kernel that refuses position-id packing
        return False
    finally:
        model.train(was_training)
    # fp32 agrees to rounding; half precision kernels differ a little by sequence length.
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    return bool((packed.float() - alone).abs().max() <= tol * alone.abs().max().clamp(min=1e-6))


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


# -- The trainer: where the loss is computed -------------------------------------------------------


class DistillTrainer(SFTTrainer):
    """TRL's SFTTrainer with its loss as a named seam, `compute_loss`.

    With --loss sft the loss is SFTTrainer's own: cross-entropy on the tokens whose label is not
    -100 (the assistant turns, see tokenize_row). With --loss kd, `kd_loss` mixes it with top-k KL
    against the teacher's logprobs, found through the batch's `kd_index`. Another loss goes here
    too; the rest of the training loop stays TRL's.
    """

    kd: Any = None  # kd.TargetTable with --loss kd (set by use_kd), else None: plain SFT
    kd_alpha, kd_temperature, kd_tail = 0.5, 1.0, True

    def use_kd(self, table: Any, cfg: FinetuneConfig) -> None:
        self.kd, self.kd_alpha, self.kd_temperature = table, cfg.kd_alpha, cfg.kd_temperature
        self.kd_tail = cfg.kd_tail

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        columns: list[str] = list(self._signature_columns or [])
        if self.kd is not None and "kd_index" not in columns:
            self._signature_columns = [*columns, "kd_index"]  # type: ignore[assignment]

    def compute_loss(  # type: ignore[override]
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if self.kd is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        return self.kd_loss(model, inputs, return_outputs, num_items_in_batch)

    def kd_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any
    ) -> Any:
        """alpha * KL(teacher top-k + tail || student) + (1 - alpha) * CE, on the same tokens.

        CE is normalized like TRL's (summed, divided by the trained tokens of the whole
        accumulated batch); the KD term is this micro-batch's mean KL weighted by its share of
        those tokens, so both sum to per-token means over the optimizer step. Both terms are
        logged (kd_loss, ce_loss: per-token means of the micro-batch).
        """
        kd_index = inputs.pop("kd_index")
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        logits = outputs.logits
        gold = labels[:, 1:]
        ce_sum = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), gold.flatten(), ignore_index=-100, reduction="sum"
        )
        local = (gold != -100).sum()
        total = local if num_items_in_batch is None else num_items_in_batch
        total = torch.as_tensor(total, device=ce_sum.device).clamp(min=1)
        t_ids, t_lps, t_mask = self.kd.gather(kd_index, labels)
        kd_term, stats = kd.topk_kd_loss(
            logits, t_ids, t_lps, t_mask, temperature=self.kd_temperature, tail=self.kd_tail
        )
        loss = self.kd_alpha * kd_term * (local / total) + (1 - self.kd_alpha) * ce_sum / total
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages the gradients
        m = self._metrics["train" if model.training else "eval"]
        m["ce_loss"].append(float(ce_sum.detach()) / max(int(local), 1))
        if stats["kd_tokens"]:
            m["kd_loss"].append(stats["kd_loss"])
            m["teacher_topk_mass"].append(stats["teacher_topk_mass"])
        m["kd_token_share"].append(stats["kd_tokens"] / max(int(local), 1))
        return (loss, outputs) if return_outputs else loss


# -- The stage: plan, prepare data, load the student, build the trainer, train, report -------------


@dataclass
class Setup:
    """What step 1 decides before anything heavy loads."""

    out: Path
    student: str  # a local student as an absolute path, so the run's record works from any cwd
    ds: Any  # the DatasetDict from `distill build`
    hw: hardware.Hardware
    plan: hardware.Plan
    last_ckpt: str | None
    started: float


@dataclass
class Tokenized:
    """Step 2's output: every row tokenized with its loss mask, and how the mask was found."""

    tokenizer: Any
    how: str  # "markers" | "rendering" (training_template)
    native_reasoning: bool  # the template renders reasoning_content
    train_rows: list[dict]
    eval_rows: list[dict]
    eot_id: int  # the end-of-turn token every trained span ends on
    label_tokens: int  # trained tokens in one pass over the train split
    kd: Any = None  # kd.TargetTable of train and eval rows with --loss kd (rows carry kd_index)


def finetune(cfg: FinetuneConfig) -> Path:
    """Train a LoRA adapter on `cfg.data` for `cfg.student`; returns the output folder."""
    cfg = resumed_config(cfg)
    setup = plan_run(cfg)
    data = prepare_data(cfg, setup)
    model, packing = load_model(cfg, setup, data)
    trainer = build_trainer(cfg, setup, data, model, packing[0])
    if data.kd is not None:
        trainer.use_kd(data.kd, cfg)
    result, train_time, final_eval = train(cfg, setup, trainer)
    trainer.save_model(str(setup.out / "adapter"))
    if trainer.is_world_process_zero():
        model.generation_config.save_pretrained(str(setup.out / "adapter"))
        write_report(cfg, setup, data, packing, trainer, result, train_time, final_eval)
    return setup.out


def main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(msg: str) -> None:
    if main_process():
        print(msg, flush=True)


# What a resumed run must share with the run it continues, saved in OUT/plan.json when training
# starts: the schedule (a longer max_steps would resume at the old schedule's final learning rate,
# 0), the adapter's shape, the data, and the plan's batch and precision (auto-fit could choose
# differently when free memory changed).
PLAN_FILE = "plan.json"
RESUME_KEYS = (
    "max_steps", "epochs", "lr", "lr_scheduler", "warmup", "weight_decay", "lora_r", "lora_alpha",
    "lora_dropout", "lora_target_modules", "use_dora", "effective_batch_size", "max_length",
    "train_on", "seed", "device", "dtype", "quantize", "batch_size", "grad_accum",
    "gradient_checkpointing", "packing", "attn_implementation",
)  # fmt: skip


def saved_plan(cfg: FinetuneConfig, plan: hardware.Plan, packing: bool) -> dict[str, Any]:
    """The settings this run trains with, auto values resolved (what OUT/plan.json holds)."""
    return {
        **cfg.model_dump(mode="json", include=set(RESUME_KEYS)),
        "device": plan.device,
        "dtype": plan.dtype,
        "quantize": "4bit" if plan.quantize else "none",
        "batch_size": plan.batch_size,
        "grad_accum": plan.grad_accum,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "packing": packing,
        "world_size": plan.world_size,
    }


def resumed_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """With --resume, the settings the run started with (OUT/plan.json): a key left unset (or
    auto) takes the saved value; one set to another value stops the run, saying how to go on."""
    path = Path(cfg.out or ".") / PLAN_FILE
    if not cfg.resume or not cfg.out or not path.is_file():
        return cfg
    saved = json.loads(path.read_text(encoding="utf-8"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if saved.get("world_size", world) != world:
        raise ConfigError(
            f"--resume: {cfg.out} trained with {saved['world_size']} process(es), this launch has "
            f"{world}; resume with the same launch, or start a fresh run with another --out"
        )
    given = cfg.model_dump(mode="json")
    for key in RESUME_KEYS:
        if key not in saved or key not in cfg.model_fields_set or given[key] in (None, "auto"):
            continue
        if given[key] != saved[key]:
            raise ConfigError(
                f"--resume: {key} {given[key]!r} differs from {saved[key]!r} that {cfg.out} "
                f"started with ({path}); resume without changing it, or start a fresh run with "
                "another --out"
            )
    return cfg.model_copy(update={k: saved[k] for k in RESUME_KEYS if k in saved})


def plan_run(cfg: FinetuneConfig) -> Setup:
    """Step 1: check every input before loading anything heavy, and fit the settings to this
    machine (hardware.plan_training); prints the plan."""
    if not cfg.data:
        raise ConfigError("no dataset: pass --data DIR (from `distill build`) or set finetune.data")
    if not cfg.student:
        raise ConfigError(
            "no student: pass --student MODEL (a folder or hub id) or set finetune.student"
        )
    if not cfg.out:
        raise ConfigError("no output folder: pass --out DIR or set finetune.out")
    out, started = claim(Path(cfg.out), "finetune"), time.time()
    ckpt_dir = out / "checkpoints"
    last_ckpt = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if cfg.resume and last_ckpt is None:
        raise ConfigError(f"--resume: no checkpoint under {ckpt_dir}; run without --resume")
    if not cfg.resume and (last_ckpt is not None or (out / "adapter").exists()):
        raise ConfigError(
            f"{out} already holds a training run; pass --resume to continue it, or another --out"
        )
    ds = read_dataset(cfg.data)
    shape = hardware.model_shape(
        resolve_student(cfg.student, cfg.trust_remote_code), cfg.lora_target_modules
    )
    if not shape.lora_shapes:
        raise ConfigError(
            f"lora_target_modules {cfg.lora_target_modules!r} matches no linear layer of "
            f"{cfg.student}; use 'all-linear' or names such as q_proj, v_proj"
        )
    hw = detect_device(cfg)
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
    return Setup(out, student_path(cfg.student), ds, hw, plan, last_ckpt, started)


def detect_device(cfg: FinetuneConfig) -> hardware.Hardware:
    """This machine, limited to the device the config asks for."""
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
    return hw


def prepare_data(cfg: FinetuneConfig, setup: Setup) -> Tokenized:
    """Step 2: tokenize every row with its loss mask, and check the mask on every row."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            setup.student, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise InputError(
            f"student {cfg.student}: cannot load its tokenizer ({str(e).splitlines()[0][:160]})"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding carries no loss (labels -100)
    template, how = training_template(tokenizer)
    native = renders_reasoning(tokenizer, template)
    ds = setup.ds
    train_rows, train_pids = tokenize_split(
        ds["train"], tokenizer, template, how, native, cfg.train_on
    )
    eot_id = check_masks(train_rows, tokenizer, train_pids, str(cfg.student))
    eval_rows, eval_pids = tokenize_split(
        ds.get("eval", []), tokenizer, template, how, native, cfg.train_on
    )
    if eval_rows:  # the eval split may be missing or empty
        check_masks(eval_rows, tokenizer, eval_pids, str(cfg.student))
    kd_table = None
    if cfg.loss == "kd":  # may splice in the teacher's segmentation: count trained tokens after
        pids = {"train": train_pids, "eval": eval_pids}
        kd_table = kd_targets(cfg, ds, tokenizer, {"train": train_rows, "eval": eval_rows}, pids)
    label_tokens = sum(sum(t != -100 for t in r["labels"]) for r in train_rows)
    return Tokenized(tokenizer, how, native, train_rows, eval_rows, eot_id, label_tokens, kd_table)


def kd_targets(cfg: FinetuneConfig, ds: Any, tokenizer: Any, rows: dict, pids: dict) -> Any:
    """--loss kd: the teacher's targets from the dataset onto the tokenized rows (kd.attach_targets),
    after checking they were aligned to this student's tokenizer and cover something."""
    rebuild = f"distill build RUN --to {cfg.data} --tokenizer {cfg.student}"
    info = read_build_report(str(cfg.data)).get("kd", {})
    if not set(kd.KD_COLUMNS) <= set(ds["train"].column_names) or not info.get("stored", True):
        raise InputError(
            f"{cfg.data} has no teacher targets for --loss kd; harvest with --logprobs "
            f"--top-logprobs K, then rebuild: {rebuild}"
        )
    if info.get("tokenizer_id") != kd.tokenizer_id(tokenizer):
        raise InputError(
            f"{cfg.data}: teacher targets were aligned to tokenizer {info.get('tokenizer')}, not "
            f"to {cfg.student}'s; rebuild for this student: {rebuild}"
        )
    if not info.get("target_tokens"):
        why = ", ".join(f"{k} {v}" for k, v in info.get("no_target", {}).items())
        raise InputError(
            f"{cfg.data}: no answer token carries a teacher target ({why or 'no answers'}); "
            f"harvest with --logprobs --top-logprobs K and rebuild: {rebuild}"
        )
    # One table for both splits; only the kd columns are read (not the messages again).
    splits = [name for name in ("train", "eval") if rows[name]]
    table = kd.attach_targets(
        [r for name in splits for r in rows[name]],
        itertools.chain(*(ds[name].select_columns(list(kd.KD_COLUMNS)) for name in splits)),
        [p for name in splits for p in pids[name]],
        rebuild,
    )
    say(
        f"  - loss kd: alpha {cfg.kd_alpha}, temperature {cfg.kd_temperature}, "
        f"{'top-k + tail' if cfg.kd_tail else 'top-k renormalized'}; {table.target_tokens} of "
        f"{table.answer_tokens} trained tokens carry a teacher target"
    )
    return table


def load_model(cfg: FinetuneConfig, setup: Setup, data: Tokenized) -> tuple[Any, tuple[bool, str]]:
    """Step 3: the student, and (packing on?, why) from whether its attention keeps packed
    sequences apart. Prints the data and loss-mask summary."""
    plan = setup.plan
    model = load_student(setup.student, cfg, plan.dtype, plan.quantize, plan.gradient_checkpointing)
    if cfg.packing is None and plan.world_size > 1:
        # Under FSDP/ZeRO-3 some ranks hold no weights yet, so no probe: every rank must decide
        # alike, from the kernel's name (these derive packed masks from position ids).
        packing = cfg.attn_implementation in ("sdpa", "eager", "flex_attention", *VARLEN_ATTENTION)
        why = f"{cfg.attn_implementation} attention " + (
            "keeps packed sequences apart" if packing else "is not known to keep sequences apart"
        )
    elif cfg.packing is None:
        packing = packing_keeps_sequences_apart(model)
        why = (
            "packed sequences stay apart" if packing else "attention leaks across packed sequences"
        )
    else:
        packing, why = cfg.packing, "set in config"

    stop_ids = model.generation_config.eos_token_id
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids or [])
    if data.eot_id not in stop_ids:
        # The template ends turns with a token generation would not stop at (LLaMA-Factory #7943):
        # the adapter's generation_config adds it.
        model.generation_config.eos_token_id = [data.eot_id, *stop_ids]
    too_long = sum(len(r["input_ids"]) > cfg.max_length for r in data.train_rows)
    say(
        f"  - packing {'on' if packing else 'off'}: {why}; loss mask by "
        + ("template {% generation %} markers" if data.how == "markers" else "template rendering")
        + f", end-of-turn token {data.tokenizer.decode([data.eot_id])!r} trained"
        + ("; reasoning_content rendered by the template" if data.native_reasoning else "")
    )
    say(
        f"data: {len(data.train_rows)} train rows ({data.label_tokens} trained tokens), "
        f"{len(data.eval_rows)} eval rows; {too_long} train rows longer than max_length "
        f"{cfg.max_length} are truncated"
    )
    return model, (packing, why)


def build_trainer(
    cfg: FinetuneConfig, setup: Setup, data: Tokenized, model: Any, packing: bool
) -> DistillTrainer:
    """Step 4: datasets (packed here unless the kernel takes TRL's packing), TrainingArguments,
    the LoRA config and the trainer. Writes OUT/config.yaml and OUT/plan.json."""
    plan, out = setup.plan, setup.out
    # Varlen kernels take TRL's own packing (one flattened row per batch); others get rows packed
    # here. TRL refuses a custom collator together with its packing.
    trl_packing = packing and cfg.attn_implementation in VARLEN_ATTENTION
    trl_packing = trl_packing and data.kd is None  # kd_index needs this module's collator
    train_ds, eval_ds, collator = training_datasets(cfg, data, packing and not trl_packing)
    loggers = report_to(cfg)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
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
        assistant_only_loss=False,  # the labels already hold the mask
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        report_to=loggers,
        seed=cfg.seed,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not main_process(),
    )
    out.mkdir(parents=True, exist_ok=True)
    if main_process():
        (out / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
        plan_json = json.dumps(saved_plan(cfg, plan, packing), indent=1)
        (out / PLAN_FILE).write_text(plan_json, encoding="utf-8")
    # TensorBoard's callback reads its folder from the environment, when the trainer is built;
    # a user's own value wins.
    tb_dir_set = "tensorboard" in loggers and "TENSORBOARD_LOGGING_DIR" not in os.environ
    if tb_dir_set:
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    try:
        return DistillTrainer(
            model=model,
            args=args,
            data_collator=collator,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=data.tokenizer,
            peft_config=hardware.lora_config(
                cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, cfg.use_dora
            ),
        )
    finally:
        if tb_dir_set:
            del os.environ["TENSORBOARD_LOGGING_DIR"]


def training_datasets(cfg: FinetuneConfig, data: Tokenized, pack: bool) -> tuple[Any, Any, Any]:
    """(train, eval or None, collator or None); with `pack`, rows packed into blocks and batched
    row by row by packed_rows_collator."""
    train_ds = Dataset.from_list(data.train_rows)
    eval_ds = Dataset.from_list(data.eval_rows) if data.eval_rows else None
    if not pack:
        return train_ds, eval_ds, with_kd_index(data, None)
    # Blocks no longer than the longest row: these kernels compute every block's full
    # block x block score matrix, so a longer block only adds masked-out work.
    block = min(cfg.max_length, max(len(r["input_ids"]) for r in data.train_rows))
    train_ds = pack_dataset(train_ds, block, "bfd")
    eval_ds = pack_dataset(eval_ds, block, "bfd") if eval_ds is not None else None
    return train_ds, eval_ds, with_kd_index(data, packed_rows_collator(data.tokenizer.pad_token_id))


def with_kd_index(data: Tokenized, collator: Any) -> Any:
    """With --loss kd, the collator (TRL's default when None) plus the rows' kd_index, padded
    with -1 (kd.kd_collator); the collator unchanged otherwise."""
    if data.kd is None:
        return collator
    return kd.kd_collator(collator or DataCollatorForLanguageModeling(data.tokenizer.pad_token_id))


def report_to(cfg: FinetuneConfig) -> str:
    """The Trainer's loggers: as configured, else TensorBoard when it is installed."""
    if cfg.report_to is not None:
        return cfg.report_to
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return "none"
    return "tensorboard"


def train(cfg: FinetuneConfig, setup: Setup, trainer: DistillTrainer) -> tuple[Any, float, dict]:
    """Step 5: train (or resume), then the held-out loss at the last step.
    Returns (TrainOutput, seconds spent training, final eval metrics or {})."""
    train_started = time.time()
    result = trainer.train(resume_from_checkpoint=setup.last_ckpt if cfg.resume else None)
    train_time = time.time() - train_started
    # Reuse the schedule's last evaluation when it ran at the last step.
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if trainer.eval_dataset is None:
        final_eval: dict[str, Any] = {}
    elif evals and evals[-1].get("step") == trainer.state.global_step:
        final_eval = evals[-1]
    else:
        final_eval = trainer.evaluate()
    return result, train_time, final_eval


def write_report(
    cfg: FinetuneConfig,
    setup: Setup,
    data: Tokenized,
    packing: tuple[bool, str],
    trainer: DistillTrainer,
    result: Any,
    train_time: float,
    final_eval: dict,
) -> None:
    """Step 6 (main process): log history, loss plot and train_report.json; stops with TrainingError if the loss ended non-finite."""
    out, plan, state = setup.out, setup.plan, trainer.state
    history = state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    plot_loss_curves(out / "log_history.json", out / "loss.png")
    final_loss = next((e["loss"] for e in reversed(history) if "loss" in e), result.training_loss)
    tokens_seen = int(state.num_input_tokens_seen)
    peak, peak_kind = peak_memory()
    report = {
        "student": setup.student,
        "data": cfg.data,
        # what eval checks its held-out prompts against
        "dataset": dataset_record(str(cfg.data), ds=setup.ds),
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0), 4),
        "tokens_seen": tokens_seen,
        "train_tokens_per_s": round(tokens_seen / train_time, 2) if train_time > 0 else None,
        "train_label_tokens_per_epoch": data.label_tokens,
        "train_runtime_s": round(float(result.metrics.get("train_runtime", train_time)), 3),
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "estimated_memory_bytes": plan.estimate.total,
        "final_train_loss": final_loss,
        "mean_train_loss": result.training_loss,
        "final_eval_loss": final_eval.get("eval_loss"),
        "loss": kd_summary(cfg, data, history, final_eval),
        "wall_time_s": round(time.time() - setup.started, 3),
        "resumed_from": setup.last_ckpt if cfg.resume else None,
        "settings": {
            "device": plan.device,
            "hardware": setup.hw.describe(),
            "dtype": plan.dtype,
            "quantize": "4bit" if plan.quantize else "none",
            "batch_size": plan.batch_size,
            "grad_accum": plan.grad_accum,
            "world_size": plan.world_size,
            "effective_batch_size": plan.effective_batch,
            "packing": packing[0],
            "gradient_checkpointing": plan.gradient_checkpointing,
            "loss_mask": data.how,
            "end_of_turn_token": data.tokenizer.decode([data.eot_id]),
            "reasoning": "reasoning_content" if data.native_reasoning else "inline <think>",
            "reasons": list(plan.reasons) + [f"packing: {packing[1]}"],
        },
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    eval_txt = f"{report['final_eval_loss']:.4f}" if report["final_eval_loss"] is not None else "-"
    say(
        f"done: {report['steps']} steps, {tokens_seen} tokens "
        f"({report['train_tokens_per_s']} tok/s), final train loss {final_loss:.4f}, "
        f"eval loss {eval_txt}; adapter in {out / 'adapter'}"
    )
    if not math.isfinite(float(final_loss)):
        raise TrainingError(f"training loss is {final_loss}; lower --lr or use --dtype fp32/bf16")


def kd_summary(cfg: FinetuneConfig, data: Tokenized, history: list, final_eval: dict) -> dict:
    """The loss used and, with kd, both terms at the end (the last logged values) and coverage."""
    if data.kd is None:
        return {"kind": "sft"}
    last = {
        k: next((h[k] for h in reversed(history) if k in h), None) for k in ("kd_loss", "ce_loss")
    }
    return {
        "kind": "kd",
        "kd_alpha": cfg.kd_alpha,
        "kd_temperature": cfg.kd_temperature,
        "kd_tail": cfg.kd_tail,
        "target_tokens": data.kd.target_tokens,
        "answer_tokens": data.kd.answer_tokens,
        "final_train_kd_loss": last["kd_loss"],
        "final_train_ce_loss": last["ce_loss"],
        "final_eval_kd_loss": final_eval.get("eval_kd_loss"),
        "final_eval_ce_loss": final_eval.get("eval_ce_loss"),
    }


def peak_memory() -> tuple[int, str]:
    """Peak memory of this process: the GPU's allocator when CUDA ran, else max RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated()), "torch.cuda.max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
