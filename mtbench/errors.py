"""The one user-facing error type.

A :class:`MtbenchError` carries a one-line message naming the bad value and what is accepted. The CLI prints it
without a traceback and exits with code 2; library callers can catch it.
"""

import re


class MtbenchError(ValueError):
    """Bad input from the user (unknown name, invalid option value, missing file). Message is one line."""


def out_of_memory(exc: BaseException) -> str | None:
    """What an allocation failure tried, or None when ``exc`` is not one.

    Recognises Python's ``MemoryError`` and torch's allocator failures: the CPU allocator's ``RuntimeError`` ("can't
    allocate memory: you tried to allocate N bytes"), ``torch.OutOfMemoryError`` (CUDA, "Tried to allocate 2.00
    GiB") and a size beyond int64 bytes ("Storage size calculation overflowed"). A configuration too large for the
    machine (``mtlora:r=99999999999``, ``--batch-size 100000000``) ends in one of these deep inside torch; the CLI
    turns it into one line that names what to lower.

    Returns:
        e.g. ``"tried to allocate 12.8 TB"``, ``"tried to allocate 2.00 GiB"``, or ``"out of memory"`` when the
        message names no size.
    """
    if isinstance(exc, MemoryError):
        return "out of memory"
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if m := re.search(r"Storage size calculation overflowed with sizes=(\[[\d, ]*\])", text):
        return f"a tensor of sizes {m.group(1)} is beyond any memory"
    if not re.search(r"can't allocate memory|out of memory", text, re.I):
        return None
    if m := re.search(r"allocate (\d+) bytes", text):
        size = float(m.group(1))
        for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
            if size < 1000 or unit == "PB":
                return f"tried to allocate {size:.3g} {unit}"
            size /= 1000
    if m := re.search(r"[Tt]ried to allocate ([\d.]+ [KMGTP]i?B)", text):
        return f"tried to allocate {m.group(1)}"
    return "out of memory"
