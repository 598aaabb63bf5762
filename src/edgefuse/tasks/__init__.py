"""Benchmarks as study tasks (`edgefuse.tasks.base.Task`), by kind in `edgefuse.tasks.registry`."""
