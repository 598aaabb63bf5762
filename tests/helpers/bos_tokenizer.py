"""A tokenizer that adds its BOS by default (as Gemma's and Llama's do), made cheaply from the tiny one."""

from __future__ import annotations

import copy


def with_default_bos(tok):
    """A copy of ``tok`` whose ``tok(text)`` puts ``bos_token`` first; ``add_special_tokens=False`` still adds none."""
    from tokenizers import processors

    out = copy.deepcopy(tok)
    bos = (out.bos_token, out.bos_token_id)
    out.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])
    assert out("a").input_ids == [bos[1]] + out("a", add_special_tokens=False).input_ids
    return out
