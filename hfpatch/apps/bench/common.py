"""What every benchmark harness, the demo and the command line share: one table formatter, the machine a
measurement ran on, torch's CPU thread count for the length of a run, and prompt encoding.

    >>> from hfpatch.apps.bench.common import describe_machine, encode_prompt, machine_line, torch_threads
    >>> with torch_threads(2):                          # restored afterwards, whatever happens inside
    ...     inputs = encode_prompt(tok, "Name three primes.", chat=True)
    ...     print(machine_line(describe_machine("cpu")))   # CPU model, cores, threads, library versions
"""
from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["format_table", "describe_machine", "machine_line", "usable_cores", "torch_threads", "encode_prompt",
           "pyplot"]


def format_table(headers: Sequence[Any], rows: Sequence[Sequence[Any] | None], *,
                 right_from: int | None = None) -> str:
    """Aligned plain-text columns under a header and a rule of dashes.

    Columns from index ``right_from`` on are right-aligned (numbers), the others left-aligned; a ``None`` row is
    a blank separator line. Trailing blanks are stripped, so a long last column adds no padding.

    Example:
        >>> print(format_table(["method", "speed-up"], [["vanilla", "1.00x"], None, ["ngram", "1.52x"]], right_from=1))
        method   speed-up
        -------  --------
        vanilla     1.00x
        <BLANKLINE>
        ngram       1.52x
    """
    widths = [max(len(str(r[i])) for r in [headers, *rows] if r is not None) for i in range(len(headers))]
    lines = []
    for row in [headers, ["-" * w for w in widths], *rows]:
        if row is None:
            lines.append("")
            continue
        cells = [str(c).rjust(w) if right_from is not None and i >= right_from else str(c).ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# the machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, torch threads, GPU, library versions, load."""
    import transformers

    from hfpatch import __version__

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hfpatch": __version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    return info


def machine_line(machine: dict[str, Any]) -> str:
    """:func:`describe_machine`'s dict as one line for reports."""
    parts = [machine["cpu"], f"{machine['usable_cores']}/{machine['cores']} cores",
             f"torch threads {machine['torch_threads']}"]
    if "gpu" in machine:
        parts.insert(0, machine["gpu"])
    parts.append(f"torch {machine['torch']}, transformers {machine['transformers']}, hfpatch {machine['hfpatch']}")
    return ", ".join(parts)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` and restore the previous count afterwards.

    ``None`` leaves the count as it is. Yields the count in effect. Callers that want every core pass
    ``threads or usable_cores()``.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (with a warning) when matplotlib is missing.

    Charts are an extra of every bench (``pip install hfpatch[bench]``): the numbers are written either way.
    """
    import warnings

    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed, so no chart was drawn (pip install 'hfpatch[bench]' "
                      "or pip install matplotlib)", stacklevel=3)
        return None
    return plt


# --------------------------------------------------------------------------------------------------
# prompts


def encode_prompt(tokenizer, text: str, *, chat: bool = True,
                  device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``generate`` inputs (``input_ids``, ``attention_mask``) for one prompt on ``device``.

    With ``chat`` the text becomes a user message through the tokenizer's chat template, when it has one;
    otherwise (or without a template) the raw text is tokenized.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(text, return_tensors="pt")
    return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}
