"""`manage.py beatlib check`: settings valid, APM server reachable (and its version);
`manage.py beatlib test`: sends a test error and says where to see it. Failures exit 1."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings  # type: ignore[import-untyped,import-not-found]
from django.core.management.base import BaseCommand, CommandError, CommandParser  # type: ignore[import-untyped,import-not-found]

from beatlib.config import Config, ConfigError, unknown_env_vars
from beatlib.contrib.django.apps import MIDDLEWARE, app_client
from beatlib.transport.http import ServerProblem, server_version


class BeatlibTestError(Exception):
    """The exception `manage.py beatlib test` sends."""


class Command(BaseCommand):
    help = "beatlib: `check` the settings and the APM server, or send a `test` error."
    requires_system_checks: list[str] = []  # a bad BEATLIB setting is reported by `check`

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=("check", "test"))

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        try:
            config = Config.from_mapping(getattr(settings, "BEATLIB", None) or {})
        except ConfigError as exc:
            raise CommandError(f"BEATLIB settings are invalid: {exc}") from None
        if not config.enabled:
            raise CommandError("beatlib is disabled (enabled is false): nothing is recorded")
        if action == "check":
            self.check_setup(config)
        else:
            self.send_test_error(config)

    def check_setup(self, config: Config) -> None:
        self.stdout.write(f"settings OK: service {config.service_name!r}, server "
                          f"{config.server_url}")
        for name, near in unknown_env_vars(os.environ):
            hint = f"; did you mean {near}?" if near else ""
            self.stdout.write(self.style.WARNING(
                f"note: {name} is not a beatlib setting and is ignored{hint}"))
        if "beatlib.contrib.django" not in settings.INSTALLED_APPS:
            self.stdout.write(self.style.WARNING(
                'note: "beatlib.contrib.django" is not in INSTALLED_APPS: nothing is traced'))
        elif MIDDLEWARE not in settings.MIDDLEWARE and "beatlib.contrib.django." \
                "TracingMiddleware" not in settings.MIDDLEWARE:
            self.stdout.write(self.style.WARNING("note: the tracing middleware is not in "
                                                 "MIDDLEWARE"))
        try:
            version = server_version(config)
        except ServerProblem as exc:
            raise CommandError(f"APM server: {exc}") from None
        self.stdout.write(self.style.SUCCESS(
            f"APM server {config.server_url} reachable, version {version or 'not told'}"))

    def send_test_error(self, config: Config) -> None:
        client = app_client()
        if client is None:
            raise CommandError("beatlib has no client: is the app set up?")
        try:
            raise BeatlibTestError("a test error sent by `manage.py beatlib test`")
        except BeatlibTestError:
            error_id = client.capture_exception(handled=True)
        if error_id is None or not client.flush(config.server_timeout + 1):
            raise CommandError(f"the test error was not accepted by {config.server_url}; "
                               "run `manage.py beatlib check` to see why")
        self.stdout.write(self.style.SUCCESS(
            f"sent test error {error_id} to {config.server_url}. See it in Kibana: "
            f"Observability > APM > Services > {config.service_name} > Errors "
            "(BeatlibTestError); with `beatlib serve`, on its /ui/ page."))
