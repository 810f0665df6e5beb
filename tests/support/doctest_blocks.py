"""The code blocks and links of the Markdown docs, for the tests that keep them true (tests/integration/test_docs.py).

A block is *runnable* when its fence's info string carries the word `run` after the language:

    ```sh run          bash, against a live server
    ```python run      the venv's python, same server

A block without `run` is shown, never executed: synopses with placeholders, output samples, and what truly cannot
run in the suite (a GPU, Kubernetes, a second machine). The Markdown is parsed with markdown-it-py (the CommonMark
parser Rich already brings), so fences inside lists and `~~~` fences count and code spans never look like links.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parents[2]
RUN_MARKER = "run"
SHELL = frozenset({"sh", "bash", "shell"})
PYTHON = frozenset({"python", "py"})


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    runnable: bool
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass(frozen=True)
class Link:
    path: Path
    line: int
    target: str  # a path; "" for a link to a heading of the same page
    fragment: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/: the Markdown a user reads."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _tokens(path: Path) -> list[Token]:
    return MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8"))


def _walk(tokens: Iterable[Token]) -> Iterator[Token]:
    for token in tokens:
        yield token
        if token.children:
            yield from _walk(token.children)


def blocks(path: Path) -> list[Block]:
    """Every fenced block of one file, runnable or not."""
    out = []
    for token in _walk(_tokens(path)):
        if token.type != "fence" or token.map is None:
            continue
        words = token.info.split()
        lang = words[0].lower() if words else ""
        out.append(Block(path, token.map[0] + 1, lang, RUN_MARKER in words[1:], token.content))
    return out


def runnable_blocks(paths: Iterable[Path] | None = None) -> list[Block]:
    """The blocks marked `run`, in file order; a marked block in a language the runner cannot run is an error."""
    found = [b for p in paths or doc_files() for b in blocks(p) if b.runnable]
    for block in found:
        if block.lang not in SHELL | PYTHON:
            raise ValueError(f"{block.where}: `run` block in {block.lang or 'no language'}; use sh or python")
    return found


def _inline_tokens(path: Path) -> Iterator[tuple[int, Token]]:
    """Each inline token with the line it sits on (a paragraph's line breaks counted)."""
    for block in _tokens(path):
        if block.type != "inline" or block.map is None:
            continue
        line = block.map[0] + 1
        for token in _walk(block.children or []):
            if token.type in ("softbreak", "hardbreak"):
                line += 1
            yield line, token


def relative_links(path: Path) -> list[Link]:
    """Links (and images) within the repository: anything without a scheme or a host, `#heading` links included."""
    out = []
    for line, token in _inline_tokens(path):
        target = token.attrGet("href") if token.type == "link_open" else token.attrGet("src")
        if token.type not in ("link_open", "image") or not isinstance(target, str):
            continue
        parts = urlsplit(target)
        if parts.scheme or parts.netloc:
            continue
        out.append(Link(path, line, unquote(parts.path), unquote(parts.fragment)))
    return out


def anchors(path: Path) -> set[str]:
    """The `#fragment` each heading of a page gets on GitHub: lower case, punctuation dropped, spaces as hyphens,
    `-1`, `-2`, … on repeats."""
    seen: dict[str, int] = {}
    tokens = _tokens(path)
    for heading, inline in zip(tokens, tokens[1:], strict=False):
        if heading.type != "heading_open":
            continue
        text = "".join(t.content for t in inline.children or [] if t.type in ("text", "code_inline"))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


REPO_PATH = re.compile(r"^(\.\./|\./)*(src|tests|deploy|docs|scripts|bench|shared)/[\w.*/-]*$")


def path_mentions(path: Path) -> list[Link]:
    """Code spans that name a file or folder by its path from the repository root (`src/darkroom/config.py`,
    `deploy/k8s/`) or from the page (`../shared/...`): a reader will look for them, so they must exist."""
    return [
        Link(path, line, token.content)
        for line, token in _inline_tokens(path)
        if token.type == "code_inline" and REPO_PATH.match(token.content) and "*" not in token.content
    ]


def broken_links(paths: Iterable[Path] | None = None) -> list[str]:
    """`file:line: target` for every relative link, or path in a code span, whose file or folder does not exist,
    and every `#heading` link to a Markdown page without that heading. A link resolves from its page's folder; a
    code-span path from the repository root, or from the page when it starts with `../` or `./`."""
    broken = []
    for page in paths or doc_files():
        for link in relative_links(page):
            target = page.parent / link.target if link.target else page
            if not target.exists():
                broken.append(f"{link.where}: {link.target}")
            elif link.fragment and target.suffix == ".md" and link.fragment not in anchors(target):
                broken.append(f"{link.where}: {link.target}#{link.fragment} (no such heading)")
        for mention in path_mentions(page):
            base = page.parent if mention.target.startswith(".") else ROOT
            if not (base / mention.target).exists():
                broken.append(f"{mention.where}: `{mention.target}`")
    return broken
