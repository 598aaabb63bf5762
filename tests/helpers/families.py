"""Tiny seeded configs of every supported model family, each with its distinctive features switched on."""

from __future__ import annotations


def make_config(case: str, tok):
    """A tiny config of the case's family with its distinctive features on (sizes chosen for 2:4 and GQA)."""
    import transformers as tf

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  tie_word_embeddings=False, initializer_range=0.2)
    gemma = dict(head_dim=24, query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=3.0,
                 tie_word_embeddings=True)
    return {
        "llama": lambda: tf.LlamaConfig(**common),
        "llama-bias": lambda: tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=8),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=24),
        # attention soft-capping exists in Gemma 2 only (Gemma 3's attention ignores the field), and only eager applies it
        "gemma2": lambda: tf.Gemma2Config(**{**common, **gemma}, attn_logit_softcapping=2.0, attn_implementation="eager"),
        "gemma3": lambda: tf.Gemma3TextConfig(**{**common, **gemma},
                                              layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: tf.Phi3Config(**common),
    }[case]()
