"""The edge side: prune the cloud model (prune.py, plan.py, importance.py), train a LoRA on the pruned
model with private data (train.py, batching.py, memory.py), recover it to the full shape (recover.py)."""
