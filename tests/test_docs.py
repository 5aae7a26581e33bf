"""The guide (docs/*.md) runs: every fenced bash and python snippet is executed, top to bottom, on tiny settings.

A snippet may be preceded by HTML comments (invisible on GitHub) that say how the test runs it:
    <!-- test: replace "OLD" "NEW" -->   substitute text first (tiny settings: fewer steps, fewer images)
    <!-- test: skip: REASON -->          not run; a reason is required
Bash snippets may only hold `mmlm ...` and `python SCRIPT ...` lines; they run in this process (`mmlm.cli.main`,
`runpy`), in a scratch directory where configs/, scripts/ and benchmarks/ point into the repository, so the
committed figures under docs/figures are never overwritten. Python snippets of one page share a namespace.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = ["README.md", "01-data-shapes.md", "02-clip.md", "03-resnet-or-vit.md", "04-llava.md", "05-generation.md",
         "06-time.md", "07-one-model.md", "results.md", "performance.md", "serving.md", "scaling.md", "gpus.md", "proven.md"]
FENCE = re.compile(r"((?:<!--\s*test:.*?-->\s*\n)*)```(\w*)\n(.*?)```", re.S)
DIRECTIVE = re.compile(r"<!--\s*test:\s*(.*?)\s*-->", re.S)


@dataclass
class Snippet:
    page: str
    line: int
    lang: str
    code: str
    skip: str = ""
    replacements: list[tuple[str, str]] = field(default_factory=list)

    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def snippets(page: str, text: str | None = None) -> list[Snippet]:
    text = (DOCS / page).read_text() if text is None else text
    out = []
    for m in FENCE.finditer(text):
        s = Snippet(page, text[:m.start(2)].count("\n") + 1, m.group(2), m.group(3))
        for d in DIRECTIVE.findall(m.group(1)):
            if d.startswith("skip:"):
                s.skip = d[len("skip:"):].strip()
                if not s.skip:
                    raise ValueError(f"{s.where()}: a skipped snippet needs a reason")
            elif d.startswith("replace "):
                old, new = shlex.split(d[len("replace "):])
                if old not in s.code:
                    raise ValueError(f"{s.where()}: replace {old!r}: not in the snippet")
                s.replacements.append((old, new))
            else:
                raise ValueError(f"{s.where()}: unknown test directive {d!r}")
        for old, new in s.replacements:
            s.code = s.code.replace(old, new)
        out.append(s)
    return out


def commands(code: str) -> list[list[str]]:
    """Shell lines -> argv lists (comments dropped, backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def run_snippet(s: Snippet, namespace: dict) -> None:
    if s.lang == "python":
        try:
            exec(compile(s.code, s.where(), "exec"), namespace)
        except Exception as e:  # name the page and line: the traceback shows the snippet's own line numbers
            raise AssertionError(f"{s.where()}: {type(e).__name__}: {e}") from e
        return
    if s.lang != "bash":
        return  # text blocks (output, layouts) are not run
    from mmlm.cli import main

    for argv in commands(s.code):
        if argv[0] == "mmlm":
            assert main(argv[1:]) == 0, f"{s.where()}: {shlex.join(argv)} failed"
        elif argv[0] == "python" and argv[1].endswith(".py"):
            old = sys.argv
            sys.argv = argv[1:]
            try:
                runpy.run_path(argv[1], run_name="__main__")
            finally:
                sys.argv = old
        else:
            raise AssertionError(f"{s.where()}: the docs test runs only `mmlm` and `python X.py` lines, got {argv}")


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    for name in ("configs", "scripts", "benchmarks"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def test_every_page_is_listed_and_every_snippet_is_run_or_says_why():
    assert sorted(PAGES) == sorted(p.name for p in DOCS.glob("*.md"))
    for page in PAGES:
        for s in snippets(page):
            assert s.lang in ("bash", "python", "text", ""), f"{s.where()}: unexpected fence language {s.lang!r}"
            if s.lang == "bash" and not s.skip:
                for argv in commands(s.code):
                    assert argv[0] in ("mmlm", "python"), f"{s.where()}: {argv[0]!r} cannot be run by the docs test"


def test_every_figure_and_link_exists():
    for page in PAGES:
        text = (DOCS / page).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith("http"):
                assert (DOCS / target).exists(), f"docs/{page} links to missing {target}"


def test_the_readme_is_a_front_page():
    """The README is what a visitor reads first: what, set-up, run, one table, links. Details live in docs/."""
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move details into docs/ (at most 250)"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a page's headings (outside code blocks); a repeated heading gets -1, -2, ... as on GitHub."""
    out, counts = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        base = slug(heading)
        n = counts.get(base, 0)
        counts[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_every_relative_link_in_the_readme_and_docs_resolves():
    """Files, folders and `#anchors` named by links in README.md and docs/**/*.md exist (code blocks skipped)."""
    pages = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (page.parent / target) if target else page
            where = f"{page.relative_to(REPO)} -> {target}{'#' + anchor if anchor else ''}"
            if not path.exists():
                broken.append(f"{where}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
                broken.append(f"{where}: no such heading")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_a_broken_snippet_fails_with_its_place(workdir):
    page = "<!-- test: replace \"1\" \"2\" -->\n```python\nassert 1 + 1 == 2\n```\n```bash\nmmlm nope\n```\n"
    fixed, broken = snippets("x.md", page)
    with pytest.raises(AssertionError, match="x.md:2"):
        run_snippet(fixed, {})
    with pytest.raises(SystemExit):
        run_snippet(broken, {})
    with pytest.raises(ValueError, match="needs a reason"):
        snippets("x.md", "<!-- test: skip: -->\n```bash\nmmlm\n```\n")


@pytest.mark.slow
def test_the_guide_runs_top_to_bottom(workdir):
    """One test, in page order: later pages use what earlier ones made (the CLIP trained on the first page)."""
    ran = 0
    for page in PAGES:
        namespace: dict = {"__name__": f"docs_{page}"}
        for s in snippets(page):
            if not s.skip:
                run_snippet(s, namespace)
                ran += 1
    assert ran >= 10
