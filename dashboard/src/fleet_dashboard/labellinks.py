"""The fleet page's label links: each label of a row a link to the filter by it, and the filter's
pairs links that drop them, keeping the rest of the page's query."""

from __future__ import annotations

import urllib.parse

from markupsafe import Markup

from .data import FleetQuery


class LabelLinks:
    """Links of the fleet page that change its label filter and keep the rest of its query. A page
    holds hundreds of them, so they are built by hand from one prefix (url_for each would cost more),
    and a row's cell of label links is made here once per set of labels on the page (most rows share
    one with others) rather than by a template loop per label."""

    def __init__(self, path: str, query: FleetQuery) -> None:
        self.path, self.labels = path, query.labels
        self._cells: dict[tuple[tuple[str, str], ...], Markup] = {}
        keep = [("q", query.q), ("state", query.state), ("sort", query.sort), ("dir", "desc" if query.desc else "asc"),
                ("per", "" if query.per_page == FleetQuery.per_page else str(query.per_page))]
        self.rest = urllib.parse.urlencode([(k, v) for k, v in keep if v])  # a new filter starts at page 1

    def _href(self, labels: dict[str, str]) -> str:
        pairs = "&".join("label=" + urllib.parse.quote(f"{k}={v}", safe="") for k, v in labels.items())
        query = "&".join(p for p in (self.rest, pairs) if p)
        return f"{self.path}?{query}" if query else self.path

    def only(self, key: str, value: str) -> str:
        """This filter with key=value instead of any other value of key."""
        return self._href({**{k: v for k, v in self.labels.items() if k != key}, key: value})

    def without(self, key: str) -> str:
        return self._href({k: v for k, v in self.labels.items() if k != key})

    def none(self) -> str:
        return self._href({})

    def cell(self, labels: dict[str, str]) -> Markup:
        """One row's labels, sorted, each a link to the filter by it (those in the filter marked "on")."""
        key = tuple(sorted(labels.items()))
        found = self._cells.get(key)
        if found is None:
            found = self._cells[key] = Markup("").join(
                Markup('<a class="label{}" data-labels href="{}" title="only agents labelled {}={}">{}={}</a>').format(
                    " on" if self.labels.get(k) == v else "", self.only(k, v), k, v, k, v) for k, v in key)
        return found
