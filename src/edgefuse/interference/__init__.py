"""Interference of LoRA adapters measured on activations: Gram matrices of module inputs (`collect`, `grams`)
and the factored metrics over them (`metrics`)."""
