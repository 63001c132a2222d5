"""LoRA-SB adapters: ``W = W0 + s·B R A`` with B, A frozen and only the r×r R trained."""

from fedsb_dp.adapters.config import DEFAULT_TARGETS, SBConfig, default_targets
from fedsb_dp.adapters.export import (
    export_peft_adapter,
    load_sb_adapter,
    load_trainable_state,
    save_merged,
    save_sb_adapter,
    save_trainable_state,
    set_trainable_state,
)
from fedsb_dp.adapters.initializers import (
    INIT_METHODS,
    InitResult,
    LayerFactors,
    gradient_svd_init,
    random_orthonormal_init,
    w0_svd_init,
)
from fedsb_dp.adapters.inject import (
    check_fingerprint,
    find_target_modules,
    frozen_fingerprint,
    inject_adapters,
    mark_trainable,
    sb_layers,
    trainable_state,
)
from fedsb_dp.adapters.layer import SBLinear

__all__ = [
    "DEFAULT_TARGETS", "INIT_METHODS", "InitResult", "LayerFactors", "SBConfig", "SBLinear",
    "check_fingerprint", "default_targets", "export_peft_adapter", "find_target_modules",
    "frozen_fingerprint", "gradient_svd_init", "inject_adapters", "load_sb_adapter",
    "load_trainable_state", "mark_trainable", "random_orthonormal_init", "save_merged",
    "save_sb_adapter", "save_trainable_state", "sb_layers", "set_trainable_state",
    "trainable_state", "w0_svd_init",
]
