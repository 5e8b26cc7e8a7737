"""docs/: every ``docs/<name>.md`` the repository cites exists, and the index lists them all."""

import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
# Where citations may appear, and in which files.
SOURCES = ("fcp_jax", "configs", "experiments", "tests", "colabs", "docs")
EXTENSIONS = (".py", ".md", ".ipynb")
CITATION = re.compile(r"(?<![\w/.-])docs/([\w.-]+\.md)\b")
INDEX_LINK = re.compile(r"\]\(([\w.-]+\.md)\)")


def _files():
  for top in SOURCES:
    for ext in EXTENSIONS:
      yield from glob.glob(os.path.join(REPO, top, "**", f"*{ext}"), recursive=True)
  yield os.path.join(REPO, "README.md")


def _citations():
  """(file, line, cited name) for every ``docs/<name>.md`` in the repository."""
  out = []
  for path in _files():
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        out.extend((os.path.relpath(path, REPO), number, name)
                   for name in CITATION.findall(line))
  return out


def test_citation_pattern():
  d = "docs" + "/"  # Spelled apart so that this file cites nothing itself.
  assert CITATION.findall(f"see ``{d}fcp_method.md`` §1.4 and ({d}a-b.md)") == [
      "fcp_method.md", "a-b.md"]
  assert not CITATION.findall(f"shared/{d}DESIGN.md, my{d}x.md, {d}x.mdx")


def test_every_cited_doc_exists():
  citations = _citations()
  cited = {name for _, _, name in citations}
  # The code cites the method, quantizer, architecture and findings docs: if the scan
  # finds fewer, it is broken, not the docs.
  assert len(citations) >= 10 and {"fcp_method.md", "ternary_methods.md"} <= cited
  missing = [f"{path}:{line}: docs/{name}" for path, line, name in citations
             if not os.path.isfile(os.path.join(DOCS, name))]
  assert not missing, "Cited docs that do not exist:\n" + "\n".join(missing)


def test_index_links_every_doc():
  with open(os.path.join(DOCS, "README.md"), encoding="utf-8") as f:
    linked = set(INDEX_LINK.findall(f.read()))
  files = {os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "*.md"))}
  files.discard("README.md")
  assert len(files) >= 5
  assert files - linked == set(), "docs/README.md does not link these files"
  assert linked - files == set(), "docs/README.md links files that do not exist"


@pytest.mark.parametrize("name", ["fcp_method.md", "ternary_methods.md"])
def test_cited_sections_exist(name):
  """``docs/<name>.md`` §N.M citations name a heading of that file."""
  with open(os.path.join(DOCS, name), encoding="utf-8") as f:
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\b", f.read(), re.M))
  sections = set()
  for path in _files():
    with open(path, encoding="utf-8") as f:
      for match in re.finditer(rf"docs/{re.escape(name)}`*\)?\s*((?:§[\d.]+[,\s]*)+)",
                               f.read()):
        sections.update(s.rstrip(".") for s in re.findall(r"§([\d.]+)", match.group(1)))
  assert sections, f"no section of docs/{name} is cited"
  assert sections <= headings, f"docs/{name} lacks sections {sorted(sections - headings)}"
