"""The API reference pages, one per module, generated from the package tree at build time.

Run by mkdocs-gen-files (``mkdocs.yml``): every module under ``src/codebook_features`` gets
``reference/<dotted name>.md`` (flat: a module named ``index`` cannot stand for its
folder's page) holding a mkdocstrings directive, and ``reference/SUMMARY.md``
lists them for mkdocs-literate-nav. Nothing is listed by hand, so a module moved or added
appears in the next build.
"""

from __future__ import annotations

from pathlib import Path

import mkdocs_gen_files

SRC = Path(__file__).resolve().parents[1] / "src"

nav = mkdocs_gen_files.Nav()
for path in sorted((SRC / "codebook_features").rglob("*.py")):
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__main__" or any(p.startswith("_") and p != "__init__" for p in parts):
        continue
    if parts[-1] == "__init__":
        parts = parts[:-1]
    name = ".".join(parts)
    doc = Path("reference", f"{name}.md")
    nav[parts] = doc.name
    with mkdocs_gen_files.open(doc, "w") as f:
        f.write(f"::: {name}\n")
    mkdocs_gen_files.set_edit_path(doc, path.relative_to(SRC.parent))

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as f:
    f.writelines(nav.build_literate_nav())
