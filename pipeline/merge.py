"""Merge a fine-tuned LoRA adapter into its student: one safetensors model, plus GGUF if we can.

    distill merge data/demo/student --to data/demo/merged

The merged folder loads with `AutoModelForCausalLM.from_pretrained` (no PEFT needed) and keeps the
tokenizer, chat template and generation config (with the end-of-turn stop token) of the fine-tune
run, its train_report.json (base student, prompt ids trained on) and log_history.json. The adapter is merged in
fp32 and the result saved in the student's own dtype.

GGUF (for llama.cpp, Ollama, LM Studio) needs llama.cpp's `convert_hf_to_gguf.py`, which is not a
pip package: we look for it at `gguf_converter`, in `$LLAMA_CPP_DIR`, then on PATH, and say so
when it is not found.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.artifacts import read_finetune_run
from pipeline.config import StageConfig
from pipeline.errors import ConfigError, InputError, TrainingError
from pipeline.outdir import MARKER, claim


class MergeConfig(StageConfig):
    """The `merge:` section of a config file; every key is also a flag."""

    out: str | None = Field(
        None, description="The fine-tune output folder (or its adapter/ folder)."
    )
    to: str | None = Field(None, description="Folder to write the merged model to.")
    student: str | None = Field(
        None, description="Base model to merge into; default: the student the run trained."
    )
    gguf: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="Also write model.gguf: auto (when llama.cpp's converter is found), yes, no.",
    )
    gguf_type: str = Field(
        "f16", description="GGUF tensor type passed to the converter (--outtype)."
    )
    gguf_converter: str | None = Field(
        None, description="Path to llama.cpp's convert_hf_to_gguf.py (else $LLAMA_CPP_DIR, PATH)."
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the student.")


def find_gguf_converter(given: str | None) -> Path | None:
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise ConfigError(f"gguf_converter {given} does not exist; pass llama.cpp's script")
        return p
    if os.environ.get("LLAMA_CPP_DIR"):
        p = Path(os.environ["LLAMA_CPP_DIR"]).expanduser() / "convert_hf_to_gguf.py"
        if p.is_file():
            return p
    for name in ("convert_hf_to_gguf.py", "convert-hf-to-gguf.py", "convert_hf_to_gguf"):
        if found := shutil.which(name):
            return Path(found)
    return None


def merge(cfg: MergeConfig) -> Path:
    """Write the merged model to `cfg.to` (and model.gguf when possible); return that folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if not cfg.out:
        raise ConfigError(
            "no fine-tune run: pass OUT (the --out of `distill finetune`) or set merge.out"
        )
    if not cfg.to:
        raise ConfigError("no destination: pass --to DIR or set merge.to")
    run = read_finetune_run(cfg.out, cfg.student)
    adapter, student, to = run.adapter, run.student, Path(cfg.to)
    assert adapter is not None  # read without merged=True: an adapter, or an InputError
    claim(to, "merge", "--to")  # never another stage's folder or a folder of foreign files
    if any(p.name != MARKER for p in to.iterdir()):
        raise ConfigError(
            f"{to} is not empty (an earlier merge); pass an empty or new folder to --to"
        )
    converter = None if cfg.gguf == "no" else find_gguf_converter(cfg.gguf_converter)
    if cfg.gguf == "yes" and converter is None:
        raise ConfigError(
            "gguf: yes, but llama.cpp's convert_hf_to_gguf.py was not found; set LLAMA_CPP_DIR to "
            "a llama.cpp checkout or pass --gguf-converter PATH"
        )

    try:
        # The student's own dtype comes from its config: loading in fp32 overwrites it in memory.
        student_config = AutoConfig.from_pretrained(
            student, trust_remote_code=cfg.trust_remote_code
        )
        base = AutoModelForCausalLM.from_pretrained(
            student, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        raise InputError(
            f"student {student}: cannot load ({str(e).splitlines()[0][:160]})"
        ) from None
    saved_dtype = getattr(student_config, "dtype", None) or torch.float32
    if isinstance(saved_dtype, str):
        saved_dtype = getattr(torch, saved_dtype, torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(saved_dtype)
    model.save_pretrained(str(to), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(str(to))
    if (adapter / "generation_config.json").exists():
        GenerationConfig.from_pretrained(str(adapter)).save_pretrained(str(to))
    # The training record goes with the weights: `distill eval` reads the base student (the one
    # merged into) and the prompt ids trained on from it, and refuses a split that shares any,
    # wherever the folder goes; the loss history goes too, for eval's loss curves.
    record = {**run.report, "student": student}
    (to / "train_report.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    if run.out is not None and (run.out / "log_history.json").is_file():
        shutil.copyfile(run.out / "log_history.json", to / "log_history.json")
    print(f"merged {adapter} into {student} -> {to}", flush=True)

    if converter is None:
        if cfg.gguf == "auto":
            print(
                "GGUF: skipped, llama.cpp's convert_hf_to_gguf.py not found "
                "(set LLAMA_CPP_DIR or --gguf-converter to write one)",
                flush=True,
            )
        return to
    gguf = to / f"model-{cfg.gguf_type}.gguf"
    args = [str(to), "--outfile", str(gguf), "--outtype", cfg.gguf_type]
    proc = subprocess.run([sys.executable, str(converter), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise TrainingError(f"GGUF conversion failed ({converter}): {last[0][:200]}")
    print(f"GGUF: {gguf}", flush=True)
    return to
