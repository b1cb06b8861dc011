"""`isolated(fn, *args)`: a benchmark's measurement in a fresh process of its own, so that no loop inherits another's
process state (malloc's thresholds and heap, oneDNN's primitive cache, compiled graphs, page cache aside)."""

from __future__ import annotations

import multiprocessing


def _child(queue, fn, args) -> None:
    queue.put(fn(*args))


def isolated(fn, *args):
    """`fn(*args)` in a new spawned process; `fn` is a module-level function, its result picklable."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(queue, fn, args))
    child.start()
    result = queue.get()
    child.join()
    if child.exitcode:
        raise RuntimeError(f"{fn.__name__}{args} exited with code {child.exitcode}")
    return result
