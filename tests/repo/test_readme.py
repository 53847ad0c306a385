"""The README is the course's front page: at most 200 lines, it gives the test command and links
docs/, and every relative link or image in it, in docs/ and in CHANGELOG.md leads to a file or
folder of the repository, so a moved or renamed file cannot leave a dead link behind."""

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAX_LINES = 200
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)+?\1", re.S)  # may wrap, not cross a paragraph
# [text](target "title") and ![alt](target); the target may be written <like this>.
INLINE = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
# [label]: target
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(<[^>]*>|\S+)", re.M)
HTML = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)


def link_targets(markdown: str) -> list[str]:
    """Return every link and image target of a Markdown text, outside code blocks and code spans."""
    kept, in_fence = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            kept.append(line)
    text = CODE_SPAN.sub("", "\n".join(kept))
    found = [
        (m.start(), m.group(1))
        for pattern in (REFERENCE, INLINE, HTML)
        for m in pattern.finditer(text)
    ]
    return [target.strip("<>") for _, target in sorted(found)]


def broken_links(markdown: str, base: Path, root: Path = ROOT) -> list[str]:
    """Return the relative targets in `markdown` that name no file or folder under `root`.

    A target is read from `base` (the page's folder), or from `root` when it starts with "/";
    its #anchor and ?query are dropped. Web and mail links (any URL with a scheme) and links to
    an anchor of the same page are not checked.
    """
    broken = []
    for target in link_targets(markdown):
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or not parts.path:
            continue
        path = unquote(parts.path)
        resolved = ((root if path.startswith("/") else base) / path.lstrip("/")).resolve()
        if not resolved.is_relative_to(root.resolve()) or not resolved.exists():
            broken.append(target)
    return broken


def test_the_readme_is_a_front_page_of_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def test_the_readme_gives_the_test_command_colab_and_links_the_docs():
    text = README.read_text()
    assert "make test" in text  # CI calls the test command the README gives
    assert "make course" in text
    assert "colab.research.google.com" in text
    targets = link_targets(text)
    assert any(target.startswith("docs/") for target in targets), "README.md links no page of docs/"
    assert "CHANGELOG.md" in targets


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves_to_a_file_in_the_repository(page):
    assert broken_links(page.read_text(), page.parent) == []


def test_the_checker_reports_a_planted_broken_link():
    page = """A page with [a good link](README.md), [one to a folder](docs/#top),
![a missing image](img/missing.png "title"), [a missing page](docs/nope.md#part),
[a way out](../outside.md) and [a reference][ref].
[![badge](https://colab.research.google.com/assets/colab-badge.svg)](https://example.com/x.md)
[mail](mailto:someone@example.com), [an anchor](#section), `[in code](code.md)`, `a span
that wraps [onto a second line](wrapped.md)`,
<img src="missing-too.png">

```
[in a fence](fenced.md)
```

[ref]: <gone.md>
"""
    assert broken_links(page, ROOT) == [
        "img/missing.png",
        "docs/nope.md#part",
        "../outside.md",
        "missing-too.png",
        "gone.md",
    ]
