"""mkdocs hook: the measured results under `benchmarks/results/` (reports and plots) join the site.

The guides link to those files the way GitHub resolves them from `docs/` (`../benchmarks/results/...`
from a page in `docs/`, `../../benchmarks/results/...` from one in `docs/guides/`), so the same Markdown
reads on GitHub and on the site. The hook adds every `.md` and `.png` file of `benchmarks/results/` to the
site under `benchmarks/results/` and rewrites those links to point there.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File


RESULTS = "benchmarks/results"
_LINK = re.compile(r"\]\(((?:\.\./)+)" + re.escape(RESULTS) + r"/")


def on_files(files, config):
    """Adds the results' reports and plots to the site.

    Args:
        files: the site's files (`mkdocs.structure.files.Files`).
        config: the mkdocs configuration.

    Returns:
        The files, the results' reports and plots added.
    """
    root = Path(config["config_file_path"]).parent
    for path in sorted((root / RESULTS).rglob("*")):
        if path.suffix in {".md", ".png"}:
            uri = path.relative_to(root).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Points a page's links into the repository's `benchmarks/results/` at the site's copies.

    Args:
        markdown: the page's Markdown.
        page: the page (`mkdocs.structure.pages.Page`).
        config: the mkdocs configuration.
        files: the site's files.

    Returns:
        The Markdown with those links relative to the page's place in the site.
    """
    depth = page.file.src_uri.count("/")  # directories between docs/ and the page

    def rewrite(match: re.Match) -> str:
        ups = match.group(1).count("../")
        if ups != depth + 1:  # not a link from docs/ up to the repository root
            return match.group(0)
        return "](" + "../" * depth + RESULTS + "/"

    return _LINK.sub(rewrite, markdown)
