"""What machine are we on, how much memory will fine-tuning take, and which settings fit.

    .venv/bin/python -m pipeline.hardware      # print this machine's description

Everything below `detect_hardware()` is a pure function of a `Hardware` value and a `ModelShape`,
so the choices can be tested for machines we do not have (a 16 GB T4, a 24 GB bf16 card, two
GPUs) by writing their description down. The rules, in the order `plan_training` applies them:

1. Device: CUDA when a GPU is visible (one process per GPU under `accelerate launch`), else CPU.
2. Precision: bf16 on Ampere or newer (compute capability >= 8.0), fp16 on older cards (T4, V100:
   no bf16 in hardware), fp32 on CPU (CPU half precision is slow and poorly covered).
3. 4-bit QLoRA when the 16-bit weights plus training at one sequence per step (activation
   checkpointing on) would not fit in 90% of one GPU; never on CPU (bitsandbytes needs CUDA).
4. Activation checkpointing only where it is needed: on CPU only when not one sequence fits
   without it (recomputation makes a CPU step much slower), on a GPU only when fewer than
   `MIN_BATCH_WITHOUT_CHECKPOINTING` sequences per step would fit without it.
5. Per-device batch: the largest power of two up to the target effective batch that fits;
   gradient accumulation makes up the rest: `batch x accumulation x processes >= target`.

The memory model is deliberately simple (weights + LoRA weights, grads and Adam states +
activations + one chunk of LM-head outputs + a fixed CUDA overhead) and errs on the high side.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3

# What we leave untouched on a GPU: the CUDA context, cuBLAS workspaces, allocator fragmentation.
CUDA_OVERHEAD_BYTES = int(1.0 * GiB)
# Fraction of device memory we plan to use; the rest absorbs what the estimate misses.
GPU_BUDGET_FRACTION = 0.90
# On CPU the optimizer shares RAM with everything else on the machine.
CPU_BUDGET_FRACTION = 0.50
# Below this many sequences per step, trade compute for memory (activation checkpointing).
MIN_BATCH_WITHOUT_CHECKPOINTING = 4
# Largest per-device batch we choose by ourselves (beyond it, accumulation is as good).
MAX_AUTO_BATCH = 64
# TRL's fused LM head computes log-probs in chunks; we count this many tokens of fp32 logits.
LOGITS_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class Hardware:
    """One machine as training sees it. Write one down to simulate a machine we do not have."""

    device: str  # "cuda" | "cpu" | "mps"
    name: str  # e.g. "Tesla T4", or the CPU for device "cpu"
    gpu_count: int = 0  # GPUs visible to this process
    gpu_memory_bytes: int = 0  # total memory of the smallest visible GPU
    compute_capability: tuple[int, int] | None = None
    cpu_memory_bytes: int = 16 * GiB
    world_size: int = 1  # processes training together (accelerate launch / torchrun)
    bitsandbytes: bool = False  # importable with a usable CUDA backend

    @property
    def bf16(self) -> bool:
        return self.device == "cuda" and native_bf16(self.compute_capability)

    def describe(self) -> str:
        if self.device == "cuda":
            cc = ".".join(map(str, self.compute_capability or ()))
            return (
                f"{self.gpu_count} x {self.name} ({self.gpu_memory_bytes / GiB:.1f} GiB, "
                f"compute capability {cc}), {self.world_size} process(es)"
            )
        return f"{self.device}: {self.name}, {self.cpu_memory_bytes / GiB:.1f} GiB RAM"


def native_bf16(compute_capability: tuple[int, int] | None) -> bool:
    """bf16 tensor cores arrived with Ampere (8.0); T4 (7.5) and V100 (7.0) lack them. Not
    `torch.cuda.is_bf16_supported()`: it says True on a T4, where bf16 is emulated (slow)."""
    return (compute_capability or (0, 0)) >= (8, 0)


# Machines the tests and docs reason about (memory as the driver reports it).
SIMULATED = {
    "cpu": Hardware(device="cpu", name="CPU", cpu_memory_bytes=16 * GiB),
    "t4": Hardware(
        device="cuda",
        name="Tesla T4",
        gpu_count=1,
        gpu_memory_bytes=int(15.6 * GiB),
        compute_capability=(7, 5),
        bitsandbytes=True,
    ),
    "a10g": Hardware(
        device="cuda",
        name="NVIDIA A10G",
        gpu_count=1,
        gpu_memory_bytes=int(22.5 * GiB),
        compute_capability=(8, 6),
        bitsandbytes=True,
    ),
    "2x4090": Hardware(
        device="cuda",
        name="NVIDIA GeForce RTX 4090",
        gpu_count=2,
        gpu_memory_bytes=int(23.6 * GiB),
        compute_capability=(8, 9),
        world_size=2,
        bitsandbytes=True,
    ),
}


def detect_hardware() -> Hardware:
    """Describe this machine (reads torch.cuda, /proc/meminfo, the launcher's WORLD_SIZE)."""
    import platform

    import torch

    cpu_mem = _cpu_memory_bytes()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        props = [torch.cuda.get_device_properties(i) for i in range(count)]
        smallest = min(props, key=lambda p: p.total_memory)
        bnb = True
        try:
            import bitsandbytes  # noqa: F401
        except Exception:  # not installed, or installed without a CUDA build
            bnb = False
        return Hardware(
            device="cuda",
            name=smallest.name,
            gpu_count=count,
            gpu_memory_bytes=int(smallest.total_memory),
            compute_capability=(smallest.major, smallest.minor),
            cpu_memory_bytes=cpu_mem,
            world_size=world,
            bitsandbytes=bnb,
        )
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Hardware(
            device="mps", name="Apple GPU (MPS)", cpu_memory_bytes=cpu_mem, world_size=world
        )
    return Hardware(
        device="cpu",
        name=platform.processor() or platform.machine(),
        cpu_memory_bytes=cpu_mem,
        world_size=world,
    )


def _cpu_memory_bytes() -> int:
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 8 * GiB


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory estimate needs, read from a model config without loading weights."""

    n_params: int  # all parameters
    linear_params: int  # parameters in the decoder's nn.Linear layers (what 4-bit quantizes)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    lora_shapes: tuple[tuple[int, int], ...] = field(default=())  # (in, out) of each LoRA target

    def lora_params(self, r: int) -> int:
        return sum(r * (i + o) for i, o in self.lora_shapes)


def lora_targets(target_modules: str | list[str]) -> str | list[str]:
    """PEFT reads a plain string as a regex over full module names: a name means a list of one."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return [target_modules]
    return target_modules


def lora_config(
    r: int, alpha: int, dropout: float, target_modules: str | list[str], use_dora: bool = False
) -> Any:
    """The adapter a run trains (finetune and onpolicy alike)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_targets(target_modules),
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )


def model_shape(config, target_modules: str | list[str] = "all-linear") -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and measure it.

    `target_modules` follows PEFT: "all-linear" (every nn.Linear in the decoder but the LM head) or
    a list of module-name suffixes (q_proj, ...). Returns shapes for matched modules only; an empty
    `lora_shapes` means the targets match nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out_emb = model.get_output_embeddings()
    n_params = sum(p.numel() for p in model.parameters())
    linear_params = 0
    shapes: list[tuple[int, int]] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out_emb:
            continue
        linear_params += module.weight.numel()
        if target_modules == "all-linear" or any(
            name == t or name.endswith("." + t) for t in lora_targets(target_modules)
        ):
            shapes.append((module.in_features, module.out_features))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(
        n_params=n_params,
        linear_params=linear_params,
        hidden_size=text.hidden_size,
        intermediate_size=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        num_layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        lora_shapes=tuple(shapes),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training process, by component, in bytes."""

    weights: int
    lora: int  # adapter weights, their gradients and Adam's two moments, all fp32
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        parts = ", ".join(
            f"{k} {getattr(self, k) / GiB:.2f}"
            for k in ("weights", "lora", "activations", "logits", "overhead")
        )
        return f"{self.total / GiB:.2f} GiB ({parts})"


def estimate_memory(
    shape: ModelShape,
    *,
    dtype: str,
    quantize: bool,
    lora_r: int,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool,
    device: str = "cuda",
) -> MemoryEstimate:
    """Peak bytes for LoRA training with this batch (sequences x `seq_len` tokens)."""
    width = 4 if dtype == "fp32" else 2
    if quantize:
        # NF4 with double quantization: ~4.13 bits per weight in the decoder's linear layers.
        # peft's prepare_model_for_kbit_training then casts every other parameter (embeddings,
        # norms, the LM head) from 16-bit to fp32: about +2 GiB for a 7B.
        weights = int(shape.linear_params * 0.516) + (shape.n_params - shape.linear_params) * 4
    else:
        weights = shape.n_params * width
    lora = shape.lora_params(lora_r) * (4 + 4 + 8)
    tokens = batch_size * seq_len
    h, i = shape.hidden_size, shape.intermediate_size
    # Per token and layer, a decoder layer keeps ~10 hidden-sized and ~5 MLP-sized tensors for
    # backward (norms, q/k/v/o inputs, gate/up/act, LoRA inputs). With memory-efficient attention
    # (sdpa / flash) there is no seq x seq score matrix to keep.
    per_layer = (10 * h + 5 * i) * width
    if gradient_checkpointing:
        # Only each layer's input survives; one layer at a time is recomputed in full.
        activations = tokens * (shape.num_layers * h * width + per_layer)
    else:
        activations = tokens * shape.num_layers * per_layer
    logits = min(tokens, LOGITS_CHUNK_TOKENS) * shape.vocab_size * 4 * 3
    overhead = CUDA_OVERHEAD_BYTES if device == "cuda" else 0
    return MemoryEstimate(weights, lora, activations, logits, overhead)


@dataclass(frozen=True)
class Plan:
    """The settings training will use, each with the reason it was chosen."""

    device: str
    dtype: str  # "bf16" | "fp16" | "fp32"
    quantize: bool  # 4-bit QLoRA
    batch_size: int  # per device
    grad_accum: int
    world_size: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    budget_bytes: int
    reasons: tuple[str, ...]

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def describe(self) -> str:
        lines = [
            f"device {self.device}, dtype {self.dtype}, 4-bit {'yes' if self.quantize else 'no'}, "
            f"batch {self.batch_size} x accumulation {self.grad_accum} x {self.world_size} "
            f"process(es) = {self.effective_batch} sequences per step, "
            f"activation checkpointing {'on' if self.gradient_checkpointing else 'off'}",
            f"memory estimate per device: {self.estimate.describe()}; "
            f"budget {self.budget_bytes / GiB:.2f} GiB",
        ]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


class PlanError(ValueError):
    """The requested settings cannot work on this hardware; the message says what to change."""


def plan_training(
    hw: Hardware,
    shape: ModelShape,
    *,
    seq_len: int,
    lora_r: int,
    target_batch: int = 16,
    dtype: str = "auto",
    quantize: str = "auto",
    batch_size: int | None = None,
    grad_accum: int | None = None,
    gradient_checkpointing: bool | None = None,
) -> Plan:
    """Choose device, precision, quantization, batch and checkpointing; given values win.
    Long on purpose: the choices feed each other in this order, and reading them in one place
    is how a user checks why a plan came out as it did (each choice is a helper above)."""
    reasons: list[str] = []
    device = hw.device
    dtype = _choose_dtype(hw, dtype, reasons)
    if device == "cuda":
        budget = int(hw.gpu_memory_bytes * GPU_BUDGET_FRACTION)
    else:
        budget = int(hw.cpu_memory_bytes * CPU_BUDGET_FRACTION)

    def est(q: bool, bs: int, gc: bool) -> MemoryEstimate:
        return estimate_memory(
            shape,
            dtype=dtype,
            quantize=q,
            lora_r=lora_r,
            batch_size=bs,
            seq_len=seq_len,
            gradient_checkpointing=gc,
            device=device,
        )

    use_4bit = _choose_4bit(hw, quantize, dtype, est(False, 1, True).total, budget, reasons)

    def largest_batch(gc: bool) -> int:
        """Largest power of two <= target (and the cap) whose estimate fits; 0 if none."""
        cap = min(target_batch, MAX_AUTO_BATCH)
        powers = [2**n for n in range(cap.bit_length())]  # 1, 2, 4, ... up to cap
        return max((bs for bs in powers if est(use_4bit, bs, gc).total <= budget), default=0)

    gc = gradient_checkpointing
    if gc is None:
        # Without checkpointing: the largest batch that fits, or whether the given batch fits.
        fits = (
            largest_batch(False)
            if batch_size is None
            else batch_size * (est(use_4bit, batch_size, False).total <= budget)
        )
        gc = _choose_checkpointing(device, fits, target_batch, seq_len, batch_size, reasons)
    if batch_size is None:
        batch_size = largest_batch(gc)
        if batch_size == 0:
            raise PlanError(
                f"not even one sequence of {seq_len} tokens fits in {budget / GiB:.1f} GiB "
                f"(estimate {est(use_4bit, 1, gc).describe()}); lower --max-length"
                + (", use --quantize 4bit" if device == "cuda" and not use_4bit else "")
                + ", or pick a smaller student"
            )
        reasons.append(
            f"batch {batch_size}: the largest power of two up to the target {target_batch} that fits"
        )
    world = max(1, hw.world_size)
    if grad_accum is None:
        grad_accum = max(1, math.ceil(target_batch / (batch_size * world)))
    return Plan(
        device=device,
        dtype=dtype,
        quantize=use_4bit,
        batch_size=batch_size,
        grad_accum=grad_accum,
        world_size=world,
        gradient_checkpointing=gc,
        estimate=est(use_4bit, batch_size, gc),
        budget_bytes=budget,
        reasons=tuple(reasons),
    )


def _choose_checkpointing(
    device: str,
    fits: int,
    target_batch: int,
    seq_len: int,
    batch_size: int | None,
    reasons: list[str],
) -> bool:
    """Activation checkpointing, given the batch that `fits` without it (0: none fits; with a
    given `batch_size`, that batch or 0)."""
    if device != "cuda":
        # Off the GPU recomputation costs more than memory is worth; only when not even one
        # sequence fits without it.
        gc = (fits if batch_size is None else 1) == 0
        reasons.append(
            "activation checkpointing: not even one sequence fits without it"
            if gc
            else f"no activation checkpointing: on {device} it only slows steps"
        )
        return gc
    need = min(MIN_BATCH_WITHOUT_CHECKPOINTING, target_batch)
    gc = fits < need if batch_size is None else fits == 0
    reasons.append(
        f"activation checkpointing: without it fewer than {need} sequences of {seq_len} tokens fit"
        if gc
        else "no activation checkpointing: the batch fits without it"
    )
    return gc


def _choose_dtype(hw: Hardware, dtype: str, reasons: list[str]) -> str:
    """The training precision: as asked (if this device has it), else the best it has."""
    device = hw.device
    if dtype == "auto":
        if device == "cuda":
            if hw.bf16:
                dtype, why = "bf16", "supports bf16"
            else:
                dtype, why = "fp16", "has no bf16 (pre-Ampere), so fp16 with loss scaling"
            reasons.append(f"{dtype}: compute capability {hw.compute_capability} {why}")
        else:
            dtype = "fp32"
            reasons.append(f"fp32: half precision on {device} is slow or unsupported")
    elif dtype == "bf16" and device == "cuda" and not hw.bf16:
        raise PlanError(
            f"dtype bf16 asked, but {hw.name} (compute capability {hw.compute_capability}) has no "
            "bf16; use --dtype fp16 or leave dtype on auto"
        )
    elif dtype in ("bf16", "fp16") and device == "cpu":
        raise PlanError(f"dtype {dtype} asked on CPU; use --dtype fp32 or leave dtype on auto")
    return dtype


def _choose_4bit(
    hw: Hardware, quantize: str, dtype: str, smallest_16bit: int, budget: int, reasons: list[str]
) -> bool:
    """4-bit QLoRA: as asked, or (auto) only on CUDA when even batch 1 with checkpointing in 16
    bits (`smallest_16bit` bytes) is over the budget."""
    device = hw.device
    if quantize == "4bit":
        if device != "cuda":
            raise PlanError(
                "4-bit quantization needs a CUDA GPU and bitsandbytes, and none is visible; "
                "use --quantize none (or auto) to train in full precision"
            )
        if not hw.bitsandbytes:
            raise PlanError(
                "4-bit quantization needs bitsandbytes: pip install 'distill[qlora]' "
                "(or bitsandbytes), or use --quantize none"
            )
        reasons.append("4-bit: asked for")
        return True
    if quantize == "none":
        return False
    use_4bit = device == "cuda" and smallest_16bit > budget
    if use_4bit:
        if not hw.bitsandbytes:
            raise PlanError(
                f"the student needs {smallest_16bit / GiB:.1f} GiB in {dtype} even at batch 1 "
                f"with checkpointing, more than the {budget / GiB:.1f} GiB budget, and 4-bit needs "
                "bitsandbytes: pip install 'distill[qlora]', or pick a smaller student"
            )
        reasons.append(
            f"4-bit: in {dtype} the student needs {smallest_16bit / GiB:.1f} GiB at batch 1, "
            f"over the {budget / GiB:.1f} GiB budget"
        )
    elif device == "cuda":
        reasons.append(f"no 4-bit: {dtype} fits ({smallest_16bit / GiB:.1f} GiB at batch 1)")
    return use_4bit


if __name__ == "__main__":
    print(detect_hardware().describe())
