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
    "positive_float",
    "probability",
    "HfpatchArgumentParser",
    "fit_table",
    "resolve_recipe_argument",
    "check_hub_reachable",
    "check_repo_id",
    "check_writable_folder",
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


class HfpatchArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are the CLI's one ``hfpatch: error:`` line (exit code 2).

    argparse's own ``error`` prints the whole usage block before the message; the README promises one line,
    so the usage is replaced by a pointer to ``--help``. Subparsers inherit this class from their parent.
    """

    def error(self, message: str):  # noqa: D102 (argparse API)
        self.exit(2, f"hfpatch: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def positive(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _finite_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0 (a sampling temperature)."""
    number = _finite_float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def probability(value: str) -> float:
    """argparse type: a number in (0, 1] (nucleus sampling's top-p)."""
    number = _finite_float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return number


def device(value: str) -> str:
    """argparse type: ``auto`` or a torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    if value == "auto":
        return value
    try:
        parsed = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1, auto)") from None
    if parsed.type == "cpu" or parsed.type == "meta":
        if parsed.type == "meta":
            raise argparse.ArgumentTypeError("'meta' holds no weights; use cpu, cuda or auto")
        return value
    backend = getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: this torch build or machine has no {parsed.type} device")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has {count} {parsed.type} device(s)")
    return value


def fit_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, width: int | None = None) -> str:
    """``format_table`` fitted to the terminal: the last column (a description) is wrapped onto continuation
    lines so that no line is wider than ``width`` (default: the terminal's, ``shutil.get_terminal_size``).

    The other columns keep their full text (names must stay copyable); when they alone leave less than 20
    characters, the last column still gets 20 and the line overflows rather than cutting a name.
    """
    import shutil
    import textwrap

    width = width or shutil.get_terminal_size((100, 24)).columns
    fixed = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers) - 1)]
    indent = sum(fixed) + 2 * len(fixed)
    room = max(20, width - indent)
    wrapped: list[list[Any]] = []
    for row in rows:
        pieces = textwrap.wrap(str(row[-1]), room, break_on_hyphens=False) or [""]
        wrapped.append([*row[:-1], pieces[0]])
        wrapped.extend([*([""] * len(fixed)), piece] for piece in pieces[1:])
    return format_table(headers, wrapped)


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
    parser.add_argument("--device", type=device,
                        help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)",
                        **default("auto"))


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Add prompt and sampling options to a subcommand that generates text."""
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file ('-' = stdin)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message with the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=positive, default=64, metavar="N",
                        help="tokens to generate (default: 64)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive_float, help="sampling temperature > 0 (with --do-sample)")
    parser.add_argument("--top-p", type=probability, help="nucleus sampling threshold in (0, 1] (with --do-sample)")
    parser.add_argument("--top-k", type=positive, help="top-k sampling, >= 1 (with --do-sample)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")


def resolve_model_dir(model: str | None) -> Path:
    """The local model folder: ``--model`` if given, else the bundled SmolLM2 (converted on first use)."""
    if model is None:
        return Path(assets.smollm2_dir(progress=True))  # a first-run conversion takes ~25 s: show its steps
    path = Path(model).expanduser()
    if not path.is_dir():
        raise CommandError(f"--model {model}: not a local folder (the command line loads local model folders only; "
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


# --------------------------------------------------------------------------------------------------
# recipes and the Hub

#: Seconds the CLI waits to open a connection to the Hub before telling the user it is unreachable.
HUB_CONNECT_TIMEOUT_S = 3.0


def _proxy_configured() -> bool:
    import os

    return any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                                  "ALL_PROXY", "all_proxy"))


def check_hub_reachable(what: str) -> None:
    """Fail fast, in one line, when the Hub endpoint cannot be reached and HF_HUB_OFFLINE is not set.

    huggingface_hub retries a failed download five times with backoff (~25 s) before it falls back to its
    cache; at a command line that is a hang. One TCP connect with a short timeout to ``HF_ENDPOINT`` answers
    the same question at once. Skipped when HF_HUB_OFFLINE is set (the library reads its cache only) and when
    a proxy is configured (the endpoint is then reached through it, not directly).
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or _proxy_configured():
        return
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=HUB_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {HUB_CONNECT_TIMEOUT_S:g} s"
        else:
            reason = exc.strerror or type(exc).__name__
        raise CommandError(
            f"{what}: cannot reach the Hub at {constants.ENDPOINT} ({reason}); to use a recipe already in the "
            "Hub cache, set HF_HUB_OFFLINE=1, else check the network or HF_ENDPOINT") from None


def check_repo_id(repo_id: str, what: str) -> None:
    """Refuse a malformed Hub repo id (``a/..``, ``a/b/c``, spaces) before any Hub call, in one line."""
    import re

    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
        # hfpatch recipes live in 'org/name' repositories; the '..' check also keeps a path out of a URL.
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id) or ".." in repo_id:
            raise HFValidationError("expected 'org/name'")
    except HFValidationError as exc:
        detail = str(exc).split(":")[0] if "expected" not in str(exc) else str(exc)
        raise CommandError(f"{what} {repo_id!r} is not a valid Hub repo id ({detail}); a Hub recipe is named "
                           "'org/name'") from None


def check_writable_folder(path: Path, what: str) -> None:
    """Refuse, before any work, an output folder that cannot be created or written (``what`` names the option)."""
    import os

    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CommandError(f"{what} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"{what} {path}: {existing} is not writable")


def resolve_recipe_argument(name: str, *, revision: str | None = None, what: str = "--recipe"):
    """Load the recipe a command argument names, checking the argument before anything slow happens.

    A local file or folder and a built-in name load directly; anything else must be a well-formed Hub repo
    id ('org/name'), and the Hub must be reachable unless HF_HUB_OFFLINE is set. Errors are ``CommandError``
    or ``RecipeError`` with one line that names ``what`` (the option or argument).
    """
    from hfpatch.recipe import Recipe, builtin_recipe_path

    path = Path(name).expanduser()
    local, builtin = path.exists(), builtin_recipe_path(name) is not None
    if revision is not None and (local or builtin):
        kind = "a local path" if local else "a built-in recipe"
        raise CommandError(f"--revision {revision!r} applies to Hub recipes, and {what} {name!r} is {kind}")
    # A bare name that is neither local nor built-in gets the library's "no recipe called ..." (it lists the
    # built-in names); it cannot reach the Hub.
    if not local and not builtin and "/" in name:
        if name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1:
            raise CommandError(f"{what} {name!r}: no such file or folder")
        check_repo_id(name, what)
        check_hub_reachable(f"{what} {name}")
    return Recipe.from_pretrained(name, revision=revision)


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
    if type(exc).__name__ == "HFValidationError":  # a malformed repo id that reached huggingface_hub
        return _one_line(exc)
    if isinstance(exc, assets.AssetError):
        return str(exc).strip()
    return _hub_error_message(exc)
