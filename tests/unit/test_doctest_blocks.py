"""The doc test's extractor: which blocks it runs, where it says they are, and which links it calls broken."""

from __future__ import annotations

import pytest

from tests.support import doctest_blocks
from tests.support.doctest_blocks import blocks, broken_links, relative_links, runnable_blocks

PAGE = """# Title

```sh run
echo one
```

```sh
echo shown, never run
```

- in a list:

  ```python run
  print("two")
  ```

~~~bash run extra words
echo three
~~~

See [the API](api.md), [a missing page](gone.md#part), [a site](https://example.com/x.md), [here](#title) and
`src/nowhere.py`; `api/edge.py` is a module path, not a file from the root. Not a link: `[x](missing.md)`.
Headings: [yes](api.md#the-api-v2), [no](api.md#nope), [no here](#nothing).
"""


@pytest.fixture
def page(tmp_path, monkeypatch):
    monkeypatch.setattr(doctest_blocks, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "api.md").write_text("# API\n\n## The `API`, v2!\n")
    path = tmp_path / "docs" / "page.md"
    path.write_text(PAGE)
    return path


def test_only_blocks_marked_run_are_run_with_their_line(page):
    found = runnable_blocks([page])
    assert [(b.where, b.lang, b.code) for b in found] == [
        ("docs/page.md:3", "sh", "echo one\n"),
        ("docs/page.md:13", "python", 'print("two")\n'),
        ("docs/page.md:17", "bash", "echo three\n"),
    ]
    assert len(blocks(page)) == 4


def test_a_run_block_in_a_language_the_runner_lacks_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(doctest_blocks, "ROOT", tmp_path)
    page = tmp_path / "x.md"
    page.write_text("```sql run\nSELECT 1;\n```\n")
    with pytest.raises(ValueError, match=r"x.md:1: `run` block in sql"):
        runnable_blocks([page])


def test_links_resolve_from_the_page_and_code_span_paths_from_the_root(page):
    assert [(link.line, link.target, link.fragment) for link in relative_links(page)] == [
        (21, "api.md", ""),
        (21, "gone.md", "part"),
        (21, "", "title"),
        (23, "api.md", "the-api-v2"),
        (23, "api.md", "nope"),
        (23, "", "nothing"),
    ]
    assert broken_links([page]) == [
        "docs/page.md:21: gone.md",
        "docs/page.md:23: api.md#nope (no such heading)",
        "docs/page.md:23: #nothing (no such heading)",
        "docs/page.md:22: `src/nowhere.py`",
    ]
