"""The README is a front door and the results have one source.

- scripts/headlines.py --check: the README's techniques table, the recipe descriptions and the parameter
  help that quote a headline number agree with docs/results/headline.json, and each headline value appears
  in the results section it names;
- README.md is at most 250 lines;
- every relative link and every repository path cited in README.md and docs/**/*.md exists (and a link's
  #anchor names a heading of its target);
- every number with a unit (x, %, ms, MAT) in README.md comes from headline.json or a results file it links;
- every results section that holds a table says its date, commit, machine, command and what was held out.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"


def _headlines_module():
    spec = importlib.util.spec_from_file_location("hfpatch_headlines", ROOT / "scripts" / "headlines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


headlines = _headlines_module()

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\n]+)`")
# Tokens in backticks that name a file or folder of this repository.
_REPO_PATH = re.compile(r"^(?:hfpatch|recipes|benchmarks|docs|examples|tests|scripts|\.ci)/[\w./+\-]*$")
_METADATA = ("Date", "Commit", "Machine", "Command", "Held out")


def _markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    out, fenced = [], False
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def test_headlines_agree():
    problems = headlines.problems(headlines.load())
    assert not problems, "\n".join(problems)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").split("\n")
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; results belong in docs/results/"


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_paths_exist(doc):
    text = _prose(doc.read_text(encoding="utf-8"))
    missing = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            missing.append(f"link {target}: {path} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in headlines.sections(file.read_text(encoding="utf-8")):
            missing.append(f"link {target}: no heading #{anchor} in {path or doc.name}")
    for token in _CODE.findall(text):
        token = token.strip().rstrip(".,;:")
        if _REPO_PATH.match(token) and "*" not in token and not (ROOT / token).exists():
            missing.append(f"path `{token}` does not exist")
    assert not missing, f"{doc.relative_to(ROOT)}:\n" + "\n".join(missing)


def test_readme_numbers_have_a_source():
    """A number with a unit in the README is a headline value, or appears as written in a linked results file."""
    text = README.read_text(encoding="utf-8")
    data = headlines.load()
    known = {headlines.value_text(entry) for entry in data["headlines"].values()}
    linked = [(ROOT / target.partition("#")[0]).resolve() for target in _LINK.findall(text)]
    results = "\n".join(path.read_text(encoding="utf-8") for path in sorted(set(linked))
                        if path.parent == RESULTS.resolve() and path.suffix == ".md")
    unsourced = []
    for match in headlines.UNIT_NUMBER.finditer(text):
        token = match.group(0)
        number = token.removeprefix("MAT ").strip()
        if number in known or token in known or token in results:
            continue
        unsourced.append(token)
    assert not unsourced, f"README numbers without a source in headline.json or a linked results file: {unsourced}"


def test_results_sections_are_dated():
    """Each section under '## Results' that holds a table starts with its Date/Commit/Machine/Command/Held out."""
    files = sorted(RESULTS.glob("*.md"))
    assert files, "docs/results/ has no results files"
    problems = []
    for file in files:
        text = file.read_text(encoding="utf-8")
        assert "\n## Results\n" in text, f"{file.name}: no '## Results' section"
        results = text.split("\n## Results\n", 1)[1]
        for section in re.split(r"\n(?=### )", results)[1:]:
            title = section.split("\n", 1)[0]
            has_table = re.search(r"^\|[ -|]*---", section, re.M)
            fields = {m.group(1) for m in re.finditer(r"^- (Date|Commit|Machine|Command|Held out):", section, re.M)}
            if has_table and set(_METADATA) - fields:
                problems.append(f"{file.name} {title!r}: missing {sorted(set(_METADATA) - fields)}")
            if fields and not re.search(r"^- Date: \d{4}-\d{2}-\d{2}", section, re.M):
                problems.append(f"{file.name} {title!r}: Date is not YYYY-MM-DD")
            if fields and not re.search(r"^- Commit: `[0-9a-f]{7,40}`", section, re.M):
                problems.append(f"{file.name} {title!r}: Commit names no commit hash")
    assert not problems, "\n".join(problems)


def test_headline_sources_are_results_files():
    data = json.loads((RESULTS / "headline.json").read_text(encoding="utf-8"))
    for key, entry in data["headlines"].items():
        assert entry["source"].startswith("docs/results/") and "#" in entry["source"], key
