#!/usr/bin/env python
"""One source for the headline numbers: docs/results/headline.json.

A number quoted in more than one place (the README's techniques table, recipe descriptions, parameter help)
is written once, in headline.json, with the results section it comes from. This script renders it into
those places and checks that they agree:

    python scripts/headlines.py           # rewrite the README table and the recipe descriptions
    python scripts/headlines.py --check   # exit 1, saying what differs, when any place disagrees

headline.json:
- "headlines": key -> {"value", "format" (a format spec for the value, e.g. ".2f"), "unit" ("x", "%", ...),
  "text" (what the number is), "source" ("docs/results/<file>.md#<anchor>")}. The rendered value (value in
  its format, then the unit) must appear in the source section, so the results file and the headline agree.
- "readme_table": {"header": [...], "rows": [[cell, ...], ...]}: the README's techniques table, rendered
  between the markers below; `{key}` in a cell becomes the value linked to its source.
- "recipes": recipe name -> description template; `{key}` becomes the value. A recipe without a template
  may quote no number with a unit.
- "mentions": [{"path", "template"}]: the rendered text must occur in that file (parameter help, docstrings).

Standard library only; it does not import hfpatch.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADLINES = ROOT / "docs" / "results" / "headline.json"
README = ROOT / "README.md"
RECIPES = ROOT / "recipes"
BEGIN, END = "<!-- headlines:begin -->", "<!-- headlines:end -->"

_KEY = re.compile(r"\{([A-Za-z0-9_.+\-]+)\}")
_DESCRIPTION = re.compile(r'("description"\s*:\s*)"(?:[^"\\]|\\.)*"')
# A number with a unit, as the README and recipe descriptions write them (2.60x, +1.90%, 0.8 ms, MAT 2.13).
UNIT_NUMBER = re.compile(r"(?<![\w.\-+])(?:[+-]?\d+(?:\.\d+)?(?:x|%|\s?ms)(?![\w])|MAT \d+(?:\.\d+)?)")


def load(path: Path = HEADLINES) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def value_text(entry: dict) -> str:
    """The value as every place writes it: formatted, then the unit."""
    value = entry["value"]
    spec = entry.get("format", "")
    body = format(value, spec) if isinstance(value, (int, float)) and spec else str(value)
    return body + entry.get("unit", "")


def render(template: str, data: dict, link: bool = False) -> str:
    """`{key}` -> the key's value (as a Markdown link to its source when `link`)."""
    headlines = data["headlines"]

    def one(match: re.Match) -> str:
        key = match.group(1)
        if key not in headlines:
            raise KeyError(f"unknown headline key {key!r}")
        text = value_text(headlines[key])
        return f"[{text}]({headlines[key]['source']})" if link else text

    return _KEY.sub(one, template)


def readme_block(data: dict) -> str:
    table = data["readme_table"]
    lines = ["| " + " | ".join(table["header"]) + " |", "| " + " | ".join("---" for _ in table["header"]) + " |"]
    for row in table["rows"]:
        if len(row) != len(table["header"]):
            raise ValueError(f"readme_table row has {len(row)} cells, header {len(table['header'])}: {row}")
        lines.append("| " + " | ".join(render(cell, data, link=True) for cell in row) + " |")
    return "\n".join(lines)


def readme_text(current: str, data: dict) -> str:
    if current.count(BEGIN) != 1 or current.count(END) != 1:
        raise ValueError(f"README.md needs exactly one {BEGIN} and one {END}")
    head, rest = current.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{readme_block(data)}\n{END}{tail}"


def recipe_text(current: str, description: str) -> str:
    matches = list(_DESCRIPTION.finditer(current))
    if len(matches) != 1:
        raise ValueError("a recipe file needs exactly one description")
    encoded = json.dumps(description, ensure_ascii=False)
    return _DESCRIPTION.sub(lambda m: m.group(1) + encoded, current, count=1)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def sections(markdown: str) -> dict[str, str]:
    """anchor -> the text of its section (heading to the next heading of the same or a higher level)."""
    lines = markdown.split("\n")
    heads, seen, in_fence = [], {}, False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"^(#{1,6})\s+(.*)$", line)
        if match:
            anchor = slug(match.group(2))
            if anchor in seen:
                seen[anchor] += 1
                anchor = f"{anchor}-{seen[anchor]}"
            else:
                seen[anchor] = 0
            heads.append((i, len(match.group(1)), anchor))
    out = {}
    for n, (start, level, anchor) in enumerate(heads):
        end = next((s for s, lv, _ in heads[n + 1:] if lv <= level), len(lines))
        out[anchor] = "\n".join(lines[start:end])
    return out


def problems(data: dict) -> list[str]:
    """Every disagreement between headline.json and the places that quote it."""
    found = []
    for key, entry in data["headlines"].items():
        missing = {"value", "text", "source"} - entry.keys()
        if missing:
            found.append(f"headline {key}: missing {sorted(missing)}")
            continue
        path, _, anchor = entry["source"].partition("#")
        file = ROOT / path
        if not file.is_file():
            found.append(f"headline {key}: source file {path} does not exist")
            continue
        parts = sections(file.read_text(encoding="utf-8"))
        if anchor not in parts:
            found.append(f"headline {key}: {path} has no section #{anchor}")
        elif value_text(entry) not in parts[anchor]:
            found.append(f"headline {key}: {value_text(entry)!r} does not appear in {entry['source']}")

    try:
        readme = README.read_text(encoding="utf-8")
        if readme_text(readme, data) != readme:
            found.append("README.md: the techniques table differs from headline.json (run scripts/headlines.py)")
    except (ValueError, KeyError) as error:
        found.append(f"README.md: {error}")

    templates = data.get("recipes", {})
    for file in sorted(RECIPES.glob("*.json")):
        name = file.stem
        text = file.read_text(encoding="utf-8")
        description = json.loads(text).get("description", "")
        if name in templates:
            try:
                wanted = render(templates[name], data)
            except KeyError as error:
                found.append(f"recipes/{file.name}: {error}")
                continue
            if description != wanted:
                found.append(f"recipes/{file.name}: description differs from headline.json (run scripts/headlines.py)")
        elif UNIT_NUMBER.search(description):
            found.append(f"recipes/{file.name}: quotes {UNIT_NUMBER.search(description).group(0)!r} without a "
                         "template in headline.json")
    for name in templates:
        if not (RECIPES / f"{name}.json").is_file():
            found.append(f"headline.json: template for a recipe that does not exist: {name}")

    for mention in data.get("mentions", []):
        file = ROOT / mention["path"]
        try:
            wanted = render(mention["template"], data)
        except KeyError as error:
            found.append(f"{mention['path']}: {error}")
            continue
        if not file.is_file():
            found.append(f"{mention['path']}: file does not exist")
        elif wanted not in file.read_text(encoding="utf-8"):
            found.append(f"{mention['path']}: does not contain {wanted!r}")
    return found


def write(data: dict) -> list[str]:
    """Render the README table and the recipe descriptions; returns the files changed."""
    changed = []
    readme = README.read_text(encoding="utf-8")
    new = readme_text(readme, data)
    if new != readme:
        README.write_text(new, encoding="utf-8")
        changed.append("README.md")
    for name, template in data.get("recipes", {}).items():
        file = RECIPES / f"{name}.json"
        text = file.read_text(encoding="utf-8")
        new = recipe_text(text, render(template, data))
        if new != text:
            file.write_text(new, encoding="utf-8")
            changed.append(f"recipes/{file.name}")
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when any place disagrees")
    args = ap.parse_args(argv)
    data = load()
    if not args.check:
        for path in write(data):
            print(f"rendered {path}")
    found = problems(data)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
