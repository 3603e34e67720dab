"""Django templates: a `template`/`django`/`render` span per `Template.render` (the engine's
template, which every backend render and `{% include %}` goes through), named by `Template.name`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from beatlib.instrumentation.registry import Instrumentation
from beatlib.instrumentation.templates import render_wrapper


def _name(template: Any) -> Any:
    return template.name


class DjangoTemplates(Instrumentation):
    name = "django_templates"
    module = "django.template.base"
    distribution = "Django"
    versions = ">= 3.2, < 7"
    library = "Django templates"
    tested = "5.2"
    wraps = "`django.template.base.Template.render`"

    def patch(self, module: ModuleType) -> None:
        # {% include %} calls render again (counted in the outer span); {% extends %} calls
        # the parent's _render, so the child template names the span.
        self.wrap_method(module, "Template.render", render_wrapper("django", _name))
