"""``hfpatch techniques`` and ``hfpatch recipes``: what the library can apply, as tables or JSON."""
from __future__ import annotations

import argparse
from typing import Any

import hfpatch
from hfpatch.apps.cli.common import CommandError, add_command, dumps, fit_table
from hfpatch.catalogue import technique_class


def register(subparsers) -> None:
    techniques = add_command(
        subparsers, "techniques", handler=_cmd_techniques,
        help="list the registered techniques and their parameters",
        description="List the techniques hfpatch can apply (a recipe's 'type' values), with their parameters, "
                    "defaults and allowed ranges.",
        examples=["hfpatch techniques", "hfpatch techniques --family generation", "hfpatch techniques token_recycling",
                  "hfpatch techniques --json"],
    )
    techniques.add_argument("name", nargs="?", help="show only this technique, with every parameter's help text")
    techniques.add_argument("--family", help="only techniques of this family (generation, attention, vision, ...)")
    techniques.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")

    recipes = add_command(
        subparsers, "recipes", handler=_cmd_recipes,
        help="list the built-in recipes",
        description="List the recipes that ship with hfpatch; pass a name to hfpatch.patch(model, NAME), "
                    "'hfpatch run --recipe NAME' or 'hfpatch recipe show NAME'.",
        examples=["hfpatch recipes", "hfpatch recipes --json"],
    )
    recipes.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def _format_param(p: dict[str, Any]) -> str:
    bounds = [f"{op}{p[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if key in p]
    if "choices" in p:
        bounds.append(f"one of {list(p['choices'])}")
    extra = f" ({', '.join(bounds)})" if bounds else ""
    return f"{p['name']}: {p['type']} = {p['default']!r}{extra}"


def _print_technique(item: dict[str, Any]) -> None:
    print(f"{item['name']}  ({item['family']})\n  {item['summary']}\n\nparameters:")
    if not item["params"]:
        print("  (none)")
    for p in item["params"]:
        print(f"  {_format_param(p)}")
        if p.get("help"):
            print(f"      {p['help']}")


def _cmd_techniques(args: argparse.Namespace) -> int:
    items = hfpatch.list_techniques()
    if args.name:
        technique_class(args.name)  # raises RecipeError listing the known names
        items = [t for t in items if t["name"] == args.name]
    if args.family:
        families = sorted({t["family"] for t in items})
        if args.family not in families:
            raise CommandError(f"--family {args.family!r}: no such family; the families are {families}")
        items = [t for t in items if t["family"] == args.family]
    if args.json:
        print(dumps(items))
    elif not items:
        print("no techniques registered" + (f" in family {args.family!r}" if args.family else ""))
    elif args.name:
        _print_technique(items[0])
    else:
        rows = [[t["name"], t["family"], ", ".join(f"{p['name']}={p['default']!r}" for p in t["params"]) or "-",
                 t["summary"]] for t in items]
        # Parameters are wrapped too: the summary alone cannot absorb a long parameter list.
        print(fit_table(["NAME", "FAMILY", "PARAMETERS  /  SUMMARY"],
                        [[name, family, f"{params}  /  {summary}"] for name, family, params, summary in rows]))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    items = hfpatch.list_recipes()
    if args.json:
        print(dumps(items))
    elif not items:
        print("no built-in recipes")
    else:
        rows = [[r["name"], ", ".join(str(t) for t in r["techniques"]), r["description"]] for r in items]
        print(fit_table(["NAME", "TECHNIQUES  /  DESCRIPTION"],
                        [[name, f"{techniques}  /  {description}"] for name, techniques, description in rows]))
    return 0
