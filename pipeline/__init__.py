"""distill: API-based black-box distillation (harvest -> build -> finetune -> eval)."""

__version__ = "0.1.0"
