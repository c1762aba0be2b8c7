"""Sphinx extension (loaded from _config.yml): keep every page's scripts and style sheets local.

The book must render with no network. The vendored MathJax and widget scripts are configured in _config.yml;
this extension covers the rest, per page, just before the HTML is rendered:

* it removes sphinx-thebe's assets. jupyter-book always loads the sphinx-thebe extension, which adds to every
  page an inline script naming ``https://unpkg.com/thebe@…`` (fetched when a reader presses a Thebe launch
  button) plus its own JS and CSS. This book has no Thebe buttons (``launch_buttons.thebe: false``), so those
  assets are dead weight and the only CDN reference left in the HTML;
* it warns (an error under ``-W``, which the runner uses) about any other script or style sheet whose URL points
  to another host, so a future config change or extension cannot quietly reintroduce a CDN.
"""

from __future__ import annotations

import re

from sphinx.util import logging

logger = logging.getLogger(__name__)

EXTERNAL_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)
THEBE_ASSETS = ("sphinx-thebe.js", "sphinx-thebe.css")


def _filename(asset) -> str:
    return str(getattr(asset, "filename", asset) or "")


def _is_thebe(asset) -> bool:
    body = (getattr(asset, "attributes", None) or {}).get("body", "") or ""
    return _filename(asset).endswith(THEBE_ASSETS) or "THEBE_JS_URL" in body


def keep_assets_local(app, pagename, templatename, context, doctree) -> None:
    for key in ("script_files", "css_files"):
        assets = context.get(key)
        if not isinstance(assets, list):
            continue
        assets[:] = [asset for asset in assets if not _is_thebe(asset)]
        for asset in assets:
            if EXTERNAL_URL.match(_filename(asset)):
                logger.warning(f"page {pagename!r} would load {_filename(asset)!r} from the network; "
                               f"vendor it under book/_static/vendor/ (see VENDOR.md) [offline_assets]",
                               type="offline_assets", location=pagename)


def setup(app):
    # After myst-nb's per-page scripts (default priority 500) have been added.
    app.connect("html-page-context", keep_assets_local, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
