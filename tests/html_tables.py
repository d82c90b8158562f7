"""Read the numbers back out of the inside-the-model HTML report (tests only)."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np


class _Tables(HTMLParser):
    """``tables[part]``: rows of ``data-value`` floats; ``tokens[part]``: rows of ``data-token``;
    ``rows[part]``: rows of cell texts; ``sections``: the ``data-view`` of each section, in order."""

    def __init__(self):
        super().__init__()
        self.tables, self.tokens, self.rows, self.sections, self.images = {}, {}, {}, [], []
        self._part = None
        self._text = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("data-view"))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "table" and "data-part" in a:
            self._part = f"{len(self.sections) - 1}:{a['data-part']}"
            self.tables[self._part], self.tokens[self._part], self.rows[self._part] = [], [], []
        if self._part and tag == "tr":
            self.tables[self._part].append([])
            self.tokens[self._part].append([])
            self.rows[self._part].append([])
        if self._part and tag in ("td", "th"):
            if "data-value" in a:
                self.tables[self._part][-1].append(float(a["data-value"]))
            if "data-token" in a:
                self.tokens[self._part][-1].append(a["data-token"])
            self._text = []

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "table":
            self._part = None
        if tag in ("td", "th") and self._text is not None and self._part:
            self.rows[self._part][-1].append("".join(self._text))
            self._text = None


def read_tables(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    return parser


def table(parsed: _Tables, section: int, part: str) -> np.ndarray:
    """The ``data-value`` cells of one table, rows with no value dropped (the header)."""
    return np.array([row for row in parsed.tables[f"{section}:{part}"] if row], dtype=float)
