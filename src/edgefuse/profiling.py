"""Peak torch allocation of a call, for memory benchmarks and tests (one implementation for both)."""

from __future__ import annotations


def allocation_peak(fn):
    """(result, peak bytes allocated by torch during fn above what was allocated before it), or
    (result, None) when the profiler saw no allocation.

    Walks the profiler's allocation events; each carries the allocator's running total, so transient
    workspaces inside an op (e.g. LAPACK's, allocated through torch) are seen, not only op outputs."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        res = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.typed[1].total_allocated, e.typed[1].alloc_size))
        stack.extend(e.children)
    if not events:
        return res, None
    events.sort()
    base = events[0][1] - events[0][2]
    return res, max(total for _, total, _ in events) - base


def median_time(fn, repeats: int):
    """(median wall seconds over ``repeats`` calls, the last call's result): the benches' side-by-side timing."""
    import statistics
    import time

    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result
