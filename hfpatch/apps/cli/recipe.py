"""``hfpatch recipe show | validate | push | pull``: one recipe, local or on the Hub."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from hfpatch.apps.cli.common import (
    CommandError,
    add_command,
    check_hub_reachable,
    check_repo_id,
    check_writable_folder,
    dumps,
    format_table,
    missing_subcommand,
    resolve_recipe_argument,
)
from hfpatch.errors import RecipeError
from hfpatch.recipe import REPO_ID, Recipe, builtin_recipe_path


def register(subparsers) -> None:
    group = add_command(
        subparsers, "recipe", handler=lambda args: missing_subcommand(group),
        help="show, validate, push or pull one recipe",
        description="Work with one recipe: a built-in name, a local hfpatch_recipe.json file or the folder "
                    "holding it, or a Hub repository id.",
        examples=["hfpatch recipe show my_recipe/", "hfpatch recipe validate a.json b/",
                  "hfpatch recipe push my_recipe/ me/my-recipe --revision v1",
                  "hfpatch recipe pull me/my-recipe --revision v1 --out my_recipe/"],
    )
    sub = group.add_subparsers(dest="recipe_command", metavar="{show,validate,push,pull}")

    show = add_command(
        sub, "show", handler=_cmd_show,
        help="print a recipe as JSON, with its tensors and the files or repos it would read",
        description="Load a recipe (validating it) and print its JSON document, where it came from, the keys, "
                    "dtypes, shapes and sizes of its tensor payload, and its resources: the files, folders or "
                    "Hub repos applying it would read or download, and whether hfpatch.patch would use them as "
                    "they are (a Hub recipe's resources need an override or trust_resources).",
        examples=["hfpatch recipe show token-recycling", "hfpatch recipe show ./my_recipe/",
                  "hfpatch recipe show me/my-recipe --revision v1 --json"],
    )
    show.add_argument("name_or_path", metavar="NAME_OR_PATH",
                      help="built-in recipe name, local .json file or folder, or Hub repo id (org/name)")
    show.add_argument("--revision", help="branch, tag or commit of a Hub recipe")
    show.add_argument("--json", action="store_true",
                      help="print one JSON object: source, recipe, tensors (dtype, shape), tensor_metadata, "
                           "tensor_bytes, remote, resources")

    validate = add_command(
        sub, "validate", handler=_cmd_validate,
        help="check local recipe files; exit 1 if any is invalid",
        description="Check each local recipe (a hfpatch_recipe.json file or the folder holding it) against the "
                    "recipe format and every technique's parameters, including its tensor file's checksum. "
                    "Prints one line per recipe; exits 1 if any is invalid.",
        examples=["hfpatch recipe validate recipes/*.json", "hfpatch recipe validate my_recipe/"],
    )
    validate.add_argument("paths", nargs="+", metavar="PATH", help="recipe .json file or folder")

    push = add_command(
        sub, "push", handler=_cmd_push,
        help="upload a local recipe to a Hub repository",
        description="Validate a local recipe and upload it (JSON plus tensor file) to a Hub model repository, "
                    "creating the repository and the branch when missing. Authenticates like huggingface_hub "
                    "does (HF_TOKEN or 'hf auth login'); HF_ENDPOINT selects the Hub.",
        examples=["hfpatch recipe push my_recipe/ me/my-recipe",
                  "hfpatch recipe push my_recipe/ me/my-recipe --revision v1 --private"],
    )
    push.add_argument("directory", metavar="DIR", help="local recipe folder (or .json file)")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository id, e.g. me/my-recipe")
    push.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--message", help="commit message")

    pull = add_command(
        sub, "pull", handler=_cmd_pull,
        help="download and validate a Hub recipe into a folder",
        description="Download a recipe from the Hub (through the Hub cache, so HF_HUB_OFFLINE=1 works for "
                    "cached revisions), validate it, and copy its files unchanged into --out. Refuses a "
                    "non-empty --out folder unless --force is given.",
        examples=["hfpatch recipe pull me/my-recipe --out my_recipe/",
                  "hfpatch recipe pull me/my-recipe --revision v1 --out my_recipe/ --force"],
    )
    pull.add_argument("repo_id", metavar="REPO_ID", help="Hub repository id, e.g. me/my-recipe")
    pull.add_argument("--revision", help="branch, tag or commit (default: the default branch)")
    pull.add_argument("--out", required=True, metavar="DIR", help="folder to write the recipe files into")
    pull.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing its recipe files")


def _tensor_summary(recipe: Recipe) -> dict[str, dict[str, Any]]:
    return {key: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for key, t in sorted(recipe.tensors.items())}


def _resource_kind(value: Any) -> str:
    """What hfpatch would do with a resource parameter's value: read a local path or download a Hub repo."""
    text = str(value)
    if Path(text).expanduser().exists():
        return "reads local path"
    if REPO_ID.match(text) and ".." not in text:
        return "downloads Hub repo (or reads a local folder of that name)"
    return "reads local path (missing here)"


def _resource_summary(recipe: Recipe) -> list[dict[str, Any]]:
    return [{"technique": r["technique"], "parameter": r["parameter"], "value": r["value"],
             "action": _resource_kind(r["value"]), "trusted": r["trusted"], "why": r["why"]}
            for r in recipe.resources()]


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cmd_show(args: argparse.Namespace) -> int:
    recipe = resolve_recipe_argument(args.name_or_path, revision=args.revision, what="recipe")
    tensors = _tensor_summary(recipe)
    metadata = dict(sorted(recipe.tensor_metadata.items()))
    # What applying the recipe would read or download, so it can be checked first (a Hub recipe's resource
    # parameters are refused by hfpatch.patch unless the caller gives or allows them).
    resources = _resource_summary(recipe)
    sizes = {key: t.numel() * t.element_size() for key, t in sorted(recipe.tensors.items())}
    if args.json:
        print(dumps({"source": recipe.source, "recipe": recipe.to_dict(), "tensors": tensors,
                     "tensor_metadata": metadata, "tensor_bytes": sizes, "remote": recipe.is_remote,
                     "resources": resources}))
        return 0
    print(f"# source: {recipe.source}")
    print(dumps(recipe.to_dict()))
    if tensors:
        print(f"# tensors ({len(tensors)}, {_human_bytes(sum(sizes.values()))} in memory):")
        rows = [[key, info["dtype"], "x".join(str(n) for n in info["shape"]) or "scalar", _human_bytes(sizes[key])]
                for key, info in tensors.items()]
        for line in format_table(["KEY", "DTYPE", "SHAPE", "SIZE"], rows).splitlines():
            print(f"#   {line}")
    else:
        print("# tensors: none")
    for key, value in metadata.items():
        print(f"# metadata {key} = {value}")
    for entry in recipe.techniques:  # TidalDecode's layers: calibrated ones, or where they will come from
        if entry.get("type") == "tidal_decode":
            print(f"# tidal_decode selection layers: {_tidal_layers(entry)}")
    if resources:
        print(f"# resources ({len(resources)}): files or repositories applying this recipe would read or download")
        rows = [[f"{r['technique']}.{r['parameter']}", str(r["value"]), r["action"],
                 "yes" if r["trusted"] else "no: give it yourself or pass trust_resources"] for r in resources]
        for line in format_table(["PARAMETER", "VALUE", "ACTION", "USED AS IS"], rows).splitlines():
            print(f"#   {line}")
    else:
        print("# resources: none (applying it reads no file or repository named by the recipe)")
    return 0


def _tidal_layers(entry: dict) -> str:
    """What a tidal_decode entry's selection layers are, in words (for ``recipe show``)."""
    layers = entry.get("selection_layers", "auto")
    if layers != "auto":
        return "the paper's formula [full_layers, round(13/32 * num_layers)]" if layers is None else str(layers)
    if entry.get("calibrated_layers") is not None:
        return (f"{entry['calibrated_layers']} (calibrated for {entry.get('calibrated_for') or '?'}; another "
                "model is probed again at patch time)")
    return "auto (probed at patch time, once per model)"


def _validate_one(raw: str) -> bool:
    """Check one local recipe and print its line (ok on stdout, invalid and warnings on stderr)."""
    path = Path(raw).expanduser()
    if not path.exists():
        # Checked here so that a typo is not looked up as a built-in name or a Hub repo.
        print(f"{raw}: invalid: no such file or folder", file=sys.stderr)
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            recipe = Recipe.from_pretrained(path)
        except RecipeError as exc:
            print(f"{raw}: invalid: {exc}", file=sys.stderr)
            return False
    types = [t["type"] for t in recipe.techniques]
    tensors = f", {len(recipe.tensors)} tensor(s)" if recipe.tensors else ""
    print(f"{raw}: ok (recipe {recipe.name!r}, format {recipe.hfpatch_version}, techniques {types}{tensors})")
    for w in caught:
        print(f"{raw}: warning: {w.message}", file=sys.stderr)
    return True


def _cmd_validate(args: argparse.Namespace) -> int:
    invalid = sum(not _validate_one(raw) for raw in args.paths)
    if invalid:
        print(f"{invalid} of {len(args.paths)} recipe(s) invalid", file=sys.stderr)
    return 1 if invalid else 0


def _cmd_push(args: argparse.Namespace) -> int:
    path = Path(args.directory).expanduser()
    if not path.exists():
        raise CommandError(f"{args.directory}: no such file or folder")
    check_repo_id(args.repo_id, "REPO_ID")
    recipe = Recipe.from_pretrained(path)
    check_hub_reachable(f"recipe push {args.repo_id}")
    commit = recipe.push_to_hub(args.repo_id, revision=args.revision, private=args.private or None,
                                commit_message=args.message)
    at = f"@{args.revision}" if args.revision else ""
    print(f"pushed recipe {recipe.name!r} to {args.repo_id}{at} (commit {commit})")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    # Usage problems are refused before any Hub request.
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CommandError(f"--out {args.out}: folder exists and is not empty; pass --force to replace its "
                           "recipe files")
    check_writable_folder(out, "--out")
    if Path(args.repo_id).expanduser().exists():
        raise CommandError(f"{args.repo_id!r} is a local path; 'recipe pull' takes a Hub repo id like 'org/name'")
    if args.revision is None and builtin_recipe_path(args.repo_id) is not None:
        raise CommandError(f"{args.repo_id!r} is not a Hub repo id (it resolved to builtin:{args.repo_id}); "
                           "use 'hfpatch recipe show' for built-in recipes")
    check_repo_id(args.repo_id, "REPO_ID")
    check_hub_reachable(f"recipe pull {args.repo_id}")
    recipe = Recipe.download(args.repo_id, out, revision=args.revision)
    commit = recipe.source.rsplit("@", 1)[1]
    print(f"pulled recipe {recipe.name!r} from {args.repo_id}@{commit} into {out}")
    # The pulled folder is local, so hfpatch.patch will trust its resource parameters: say what they are.
    for r in recipe.resources():
        print(f"note: it names a file or repo to read, {r['technique']}.{r['parameter']} = {r['value']!r} "
              f"({_resource_kind(r['value'])}); check it before applying {out}")
    return 0
