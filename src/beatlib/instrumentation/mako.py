"""Mako: a `template`/`mako`/`render` span per `Template.render` and `render_unicode`,
named by the template's lookup uri ("page.mako"), else its file's base name, else `<string>`."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from beatlib.instrumentation.registry import Instrumentation
from beatlib.instrumentation.templates import render_wrapper


def _name(template: Any) -> str | None:
    # A DefTemplate (Template.get_def) has no uri of its own: it is named by its template.
    template = getattr(template, "parent", None) or template
    uri: str = template.uri
    if uri.startswith("memory:"):  # Mako's made-up uri of a string template: an id, no name
        return None
    filename = template.filename
    # A template made from a file without a uri gets the file's whole path as its uri; the
    # base name is enough to know it and keeps machine-specific paths out of span names.
    if filename and uri == os.path.normpath(os.path.splitdrive(filename)[1]).replace(os.sep, "/"):
        return os.path.basename(filename)
    # As Mako does for its module names: "/page.mako" and "page.mako" are the same template.
    return uri.replace("\\", "/").lstrip("/")


class Mako(Instrumentation):
    name = "mako"
    module = "mako.template"
    distribution = "Mako"
    versions = ">= 1.1, < 2"
    library = "Mako"
    tested = "1.4"
    wraps = "`Template.render`, `render_unicode`"

    def patch(self, module: ModuleType) -> None:
        # Inheritance, <%include> and namespaces render through mako.runtime, not these.
        self.wrap(module, "Template.render", render_wrapper("mako", _name))
        self.wrap(module, "Template.render_unicode", render_wrapper("mako", _name))
