"""Model cards (a version's README.md) as safe HTML.

markdown-it-py renders CommonMark with raw HTML switched off, so any ``<script>`` or ``<img onerror>`` in a card
comes out as visible text; its link validation drops ``javascript:``, ``vbscript:``, ``file:`` and non-image
``data:`` URLs. Relative links and images point at the version's own files (``loss.png``), so they are rewritten
to the page that serves those files; every other link gets ``rel="noopener noreferrer nofollow"``.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from markdown_it import MarkdownIt
from markupsafe import Markup


def _is_relative(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and not url.startswith(("/", "#"))


def render_markdown(text: str, file_url: Callable[[str], str] | None = None) -> Markup:
    """``text`` as HTML with raw HTML escaped; relative URLs go through ``file_url`` (or are dropped)."""
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")

    def fix(tokens, idx, attr: str) -> None:
        token = tokens[idx]
        url = token.attrGet(attr)
        if isinstance(url, str) and _is_relative(url):
            token.attrSet(attr, file_url(url) if file_url else "#")

    def image(self, tokens, idx, options, env):
        fix(tokens, idx, "src")
        tokens[idx].attrSet("loading", "lazy")
        return self.image(tokens, idx, options, env)  # the stock rule, after the rewrite

    def link_open(self, tokens, idx, options, env):
        fix(tokens, idx, "href")
        href = tokens[idx].attrGet("href") or ""
        if not _is_relative(str(href)) and urlsplit(str(href)).scheme:
            tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        return self.renderToken(tokens, idx, options, env)

    md.add_render_rule("image", image)
    md.add_render_rule("link_open", link_open)
    return Markup(md.render(text or ""))
