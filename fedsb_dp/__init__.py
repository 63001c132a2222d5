"""fedsb-dp: differentially private federated fine-tuning with Fed-SB (LoRA-SB adapters)."""

__version__ = "0.1.0"
