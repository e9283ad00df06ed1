"""The documentation's links: every relative link in README.md, docs/*.md and benchmarks/README.md
names a file that exists and, with a `#anchor`, a heading of that file (GitHub's anchors); the README
stays a front page. Pure file reading."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 250

# [text](target) and ![alt](target); the text may run over lines. An optional "title" after the target.
LINK = re.compile(r"\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(text: str) -> list[str]:
    """The lines of a markdown text outside fenced code blocks (a link or heading there is code)."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        if not in_code:
            lines.append(line)
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped (word characters, '-' and spaces
    kept), each space turned into '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets '-1', '-2', ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(path: pathlib.Path) -> list[str]:
    """The targets of the file's links that are not URLs (no scheme such as https: or mailto:)."""
    text = "\n".join(_prose(path.read_text()))
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [t for t in LINK.findall(text) if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def broken_links(path: pathlib.Path) -> list[str]:
    """The relative links of a markdown file that name no existing file, or a heading it lacks."""
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor})")
    return broken


def test_every_relative_link_resolves():
    assert len(DOCS) >= 4
    broken = {str(p.relative_to(ROOT)): broken_links(p) for p in DOCS}
    assert not {name: links for name, links in broken.items() if links}, broken


def test_the_docs_link_to_each_other():
    readme_links = relative_links(ROOT / "README.md")
    for doc in (ROOT / "docs").glob("*.md"):
        assert f"docs/{doc.name}" in readme_links, f"README.md does not link to docs/{doc.name}"
    assert "benchmarks/README.md" in readme_links


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Decode-step memory, Ouro-1.4B vs MELT-1.6B\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title: here\n\n"
        "[fine](other.md) [fine](other.md#decode-step-memory-ouro-14b-vs-melt-16b) [self](#title-here)\n"
        "[web](https://example.com/missing.md) `[code](missing.md)`\n"
        "```\n[in a code block](missing.md)\n```\n"
        "[made up](no_such_file.md) ![made up image](img/none.png)\n"
        "[over\nlines](other.md#no-such-heading) [self](#not-here)\n"
    )
    assert broken_links(page) == [
        "no_such_file.md (no such file)",
        "img/none.png (no such file)",
        "other.md#no-such-heading (no heading #no-such-heading)",
        "#not-here (no heading #not-here)",
    ]


def test_github_slugs():
    assert github_slug("Embedded default: spread over seeds and thread counts") == (
        "embedded-default-spread-over-seeds-and-thread-counts"
    )
    assert github_slug("Layer layout: scanned for training, unrolled for decoding") == (
        "layer-layout-scanned-for-training-unrolled-for-decoding"
    )
    assert github_slug("Training memory on v5p-8 (compile only)") == "training-memory-on-v5p-8-compile-only"
    assert github_slug("`int8` weights") == "int8-weights"


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < README_MAX_LINES
    assert ".venv/bin/python -m pytest -q" in readme  # .ci/run runs the README's test command


def test_readme_installs_the_main_job_first_and_the_test_extra_for_the_tests():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines() if line[:1] not in "#"]
    main_job, tests = [line for line in commands if line.strip()]
    # The main job needs no extra (the test extra is 2.8 GB, the main job 1.1 GB).
    assert "pip install -e . &&" in main_job and "[" not in main_job and "melt-train pipeline" in main_job
    assert tests == '.venv/bin/python -m pip install -e ".[test]" && .venv/bin/python -m pytest -q'
    # .ci/run does the set-up of a fresh clone, then both halves of the README's test command.
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci and '.venv/bin/python -m pip install -q -e ".[test]"' in ci
    assert ci.rstrip().endswith(".venv/bin/python -m pytest -q")
    # Modules inside the packages are named in docs/, where they are described, not on the front page.
    assert not re.findall(r"melt_jax[/.](?:model|inference|data)[/.]\w+", readme)
