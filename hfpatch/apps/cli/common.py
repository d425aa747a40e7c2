"""What every ``hfpatch`` command shares: the error type, JSON and table output, declaring a subcommand, the
model and generation options, loading a local model, and turning an exception into the one-line message the
user sees."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from hfpatch.apps import assets
from hfpatch.apps.bench.common import format_table
from hfpatch.errors import HfpatchError

__all__ = [
    "DEFAULT_PROMPT",
    "CommandError",
    "dumps",
    "format_table",
    "add_command",
    "missing_subcommand",
    "positive",
    "add_model_arguments",
    "add_generation_arguments",
    "resolve_model_dir",
    "load_local_model",
    "read_prompt",
    "generation_kwargs",
    "error_message",
    "show_warning",
]

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number."
DTYPES = ("float32", "bfloat16", "float16")


class CommandError(HfpatchError):
    """A command-line problem the user can fix (bad path, conflicting options, refused overwrite)."""


# --------------------------------------------------------------------------------------------------
# output


def _json_default(value: Any) -> Any:
    """Make stats and technique metadata printable: tensors become lists (small) or a shape summary."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() <= 64:
            return value.tolist()
        return f"<tensor {value.dtype} {list(value.shape)}>"
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def dumps(value: Any) -> str:
    """``value`` as indented JSON; tensors, sets and paths included (see ``_json_default``)."""
    return json.dumps(value, indent=2, default=_json_default, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# declaring a subcommand


def add_command(subparsers, name: str, *, help: str, description: str, examples: Sequence[str],
                handler: Callable[[argparse.Namespace], int], notes: str = "",
                **parser_kwargs: Any) -> argparse.ArgumentParser:
    """Add subcommand ``name``: a one-line ``help``, a ``description``, an epilog of ``examples`` (one command
    line each) and ``notes``, and the ``handler(args) -> exit code`` that runs it."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) + (f"\n\n{notes}" if notes else "")
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter, **parser_kwargs)
    parser.set_defaults(handler=handler)
    return parser


def missing_subcommand(parser: argparse.ArgumentParser) -> int:
    """The handler of a command group called without its subcommand: usage on stderr, exit code 2."""
    parser.print_help(sys.stderr)
    return 2


def positive(value: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


# --------------------------------------------------------------------------------------------------
# running a model


def add_model_arguments(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """Add --model, --dtype and --device to a subcommand that loads a causal LM.

    ``defaults=False`` leaves the defaults to a parent parser that declares the same options (a sub-subcommand
    such as ``bench long-context``, whose parser then takes ``argument_default=argparse.SUPPRESS``).
    """
    default = (lambda value: {"default": value}) if defaults else (lambda value: {})
    parser.add_argument("--model", metavar="DIR",
                        help="local model folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: float32)", **default("float32"))
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)",
                        **default("auto"))


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add prompt and sampling options to a subcommand that generates text."""
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file ('-' = stdin)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message with the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default: 64)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --do-sample)")
    parser.add_argument("--top-k", type=int, help="top-k sampling (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")


def resolve_model_dir(model: str | None) -> Path:
    """The local model folder: ``--model`` if given, else the bundled SmolLM2 (converted on first use)."""
    if model is None:
        return Path(assets.smollm2_dir())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CommandError(f"--model {model}: not a local folder (hfpatch run loads local folders only; "
                           "download a Hub model first, e.g. with 'hf download ORG/NAME --local-dir DIR')")
    if not (path / "config.json").is_file():
        raise CommandError(f"--model {model}: no config.json in that folder; is it a saved transformers model?")
    return path


def load_local_model(model: str | None, *, dtype: str = "float32", device: str = "auto"):
    """Load ``(model, tokenizer, folder)`` from a local folder without touching the network.

    ``local_files_only=True`` keeps transformers from contacting the Hub whatever HF_HUB_OFFLINE says, so a
    missing file is reported at once instead of after a download attempt.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # A weight-loading progress bar for a local folder is noise between the command and its answer.
    bars = transformers.logging.is_progress_bar_enabled()
    if not logger.isEnabledFor(logging.INFO):
        transformers.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"could not load a causal LM and tokenizer from {folder}: {first}") from exc
    finally:
        if bars:
            transformers.logging.enable_progress_bar()
    return lm.to(device).eval(), tokenizer, folder


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from --prompt, --prompt-file (``-`` reads stdin) or the default."""
    if args.prompt_file:
        if args.prompt_file == "-":
            return sys.stdin.read()
        try:
            return Path(args.prompt_file).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"--prompt-file {args.prompt_file}: {exc}") from None
    return args.prompt if args.prompt is not None else DEFAULT_PROMPT


def generation_kwargs(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    """generate() keyword arguments from the generation options."""
    if args.max_new_tokens < 1:
        raise CommandError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    given = [f"--{k.replace('_', '-')}" for k, v in sampling.items() if v is not None]
    if given and not args.do_sample:
        raise CommandError(f"{', '.join(given)} only apply with --do-sample")
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    kwargs.update({k: v for k, v in sampling.items() if v is not None})
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.eos_token_id  # else generate() warns on every call
    return kwargs


# --------------------------------------------------------------------------------------------------
# errors and warnings


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the CLI: a user needs the message, not the library file and line."""
    print(f"hfpatch: warning: {message}", file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _http_errors() -> tuple[type, ...]:
    """The HTTP client's base error types (huggingface_hub 2.x uses ``httpx2``, older releases ``httpx``)."""
    found = []
    for name in ("httpx2", "httpx"):
        module = sys.modules.get(name)  # only a module that was imported can have raised
        if module is not None and isinstance(getattr(module, "HTTPError", None), type):
            found.append(module.HTTPError)
    return tuple(found)


def _hub_error_message(exc: BaseException) -> str | None:
    """One line for errors of huggingface_hub or its HTTP client (auth, network, offline mode), else None."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, (HfHubHTTPError, OfflineModeIsEnabled)):
        return _one_line(exc)
    if isinstance(exc, _http_errors()):
        return f"cannot reach the Hub at {constants.ENDPOINT}: {_one_line(exc)}"
    return None


def error_message(exc: BaseException) -> str | None:
    """What ``hfpatch: error:`` prints for an error the user can fix; None for a bug (the traceback is kept).

    hfpatch errors and Hub/network errors become one line; a missing offline asset keeps its pip command on a
    line of its own, ready to copy.
    """
    if isinstance(exc, HfpatchError):
        return _one_line(exc)
    if isinstance(exc, assets.AssetError):
        return str(exc).strip()
    return _hub_error_message(exc)
