"""docs/architecture.md matches the tree: every module is named in its module tree, every path it
names exists, and nothing in the repository points to design documents outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "saeforge"
DOC = ROOT / "docs" / "architecture.md"
BEING_ADDED = "(being added)"


def module_tree() -> dict[str, bool]:
    """The paths in the doc's "## Modules" tree (relative to src/saeforge) → marked as being added.

    The tree is the first fenced block after the heading; each line is `<2 spaces per level><name>
    <what it owns>`, directories end with "/", and the first line is the package itself.
    """
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Modules"):]
    block = section.split("```")[1].strip("\n").splitlines()
    assert block[0].split()[0] == "saeforge/", "the tree starts with saeforge/"
    tree: dict[str, bool] = {}
    parents: list[str] = []
    for line in block[1:]:
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        assert 1 <= depth <= len(parents) + 1, f"bad indentation in the module tree: {line!r}"
        parents = parents[: depth - 1]
        path = "/".join(parents + [name.rstrip("/")])
        tree[path] = BEING_ADDED in line
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
    return tree


def modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def test_every_module_is_in_the_tree():
    tree = module_tree()
    missing = [m for m in modules() if m not in tree]
    assert not missing, f"modules missing from the tree in {DOC.relative_to(ROOT)}: {missing}"


def test_every_path_in_the_tree_exists_unless_being_added():
    tree = module_tree()
    absent = [p for p, added in tree.items() if not added and not (PACKAGE / p).exists()]
    assert not absent, f"{DOC.relative_to(ROOT)} names paths that do not exist: {absent}"
    landed = [p for p, added in tree.items() if added and (PACKAGE / p).exists()]
    assert not landed, f"these exist now: drop {BEING_ADDED!r} from their lines in {DOC.relative_to(ROOT)}: {landed}"


def test_paths_named_in_the_text_exist():
    """Backticked file paths (`sae/model.py`, `tests/test_docs.py`, `configs/...`) resolve against the
    repository or the package; placeholders (`<stage>`) and globs are not paths."""
    tree = module_tree()
    named = set(re.findall(r"`([\w./-]+)`", DOC.read_text(encoding="utf-8")))
    paths = {n for n in named if n.endswith(".py") or ("/" in n and re.search(r"\.(py|yaml|html|sh|md|toml)$", n))}
    assert "sae/model.py" in paths and "atomic.py" in paths
    absent = [p for p in sorted(paths)
              if not (ROOT / p).exists() and not (PACKAGE / p).exists() and not tree.get(p, False)]
    assert not absent, f"{DOC.relative_to(ROOT)} names files that do not exist: {absent}"


def test_readme_links_the_doc_and_nothing_points_outside_the_repo():
    assert "docs/architecture.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    outside = re.compile(r"(\.\./)?shared/|DESIGN\.md")
    files = [ROOT / "README.md", ROOT / "Makefile", *ROOT.glob("*.py"), *(ROOT / "docs").rglob("*.md")]
    text_suffixes = (".py", ".yaml", ".sh", ".md", ".html")
    for folder in ("src", "configs", "scripts", "bench"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in text_suffixes]
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files
                 for m in outside.finditer(p.read_text(encoding="utf-8"))]
    assert not offenders, f"references to files outside the repository: {offenders}"
