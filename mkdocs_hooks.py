"""MkDocs hooks of the documentation build (registered in ``mkdocs.yml``).

The API pages are rendered from Google-style docstrings. Sphinx cross-reference roles
(``:class:`Name```) are not part of that style and would show literally, so every
page is checked for them after rendering; a warning fails the strict build.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.plugins.jaxmodules")

# After Markdown rendering a role reads ":class:<code>Name</code>".
_SPHINX_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|ref|const|term):<code>([^<]*)</code>"
)


def on_page_content(html: str, page: Any, **_: Any) -> str:
    for name in sorted(set(_SPHINX_ROLE.findall(html))):
        log.warning(
            "%s shows a Sphinx role around %r literally; in a docstring write `%s` or a "
            "cross-reference such as [%s][jaxmodules.package.%s]",
            page.file.src_uri,
            name,
            name,
            name,
            name,
        )
    return html
