"""`manage.py beatlib check`: settings valid, APM server reachable (and its version);
`manage.py beatlib test`: sends a test error and says where to see it. Failures exit 1."""

from __future__ import annotations

import json
from typing import Any

import urllib3
from django.conf import settings  # type: ignore[import-untyped,import-not-found]
from django.core.management.base import BaseCommand, CommandError, CommandParser  # type: ignore[import-untyped,import-not-found]

from beatlib.config import Config, ConfigError
from beatlib.contrib.django.apps import MIDDLEWARE, app_client


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
        if "beatlib.contrib.django" not in settings.INSTALLED_APPS:
            self.stdout.write(self.style.WARNING(
                'note: "beatlib.contrib.django" is not in INSTALLED_APPS: nothing is traced'))
        elif MIDDLEWARE not in settings.MIDDLEWARE and "beatlib.contrib.django." \
                "TracingMiddleware" not in settings.MIDDLEWARE:
            self.stdout.write(self.style.WARNING("note: the tracing middleware is not in "
                                                 "MIDDLEWARE"))
        version = server_version(config)
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


def server_version(config: Config) -> str | None:
    """GET / of the APM server: its version (None if it does not say); CommandError when it
    is unreachable or refuses us."""
    headers = {}
    if config.api_key:
        headers["Authorization"] = f"ApiKey {config.api_key}"
    elif config.secret_token:
        headers["Authorization"] = f"Bearer {config.secret_token}"
    pool: dict[str, Any] = {"ca_certs": config.server_ca_cert_file}
    if not config.verify_server_cert:
        pool.update(cert_reqs="CERT_NONE", assert_hostname=False)
    try:
        resp = urllib3.PoolManager(**pool).request(
            "GET", config.server_url + "/", headers=headers, retries=False,
            timeout=urllib3.Timeout(connect=config.server_timeout, read=config.server_timeout))
    except Exception as exc:
        raise CommandError(f"APM server {config.server_url} unreachable: {exc}") from None
    if resp.status in (401, 403):
        raise CommandError(f"APM server {config.server_url} refused our credentials (HTTP "
                           f"{resp.status}): check secret_token / api_key")
    if resp.status >= 300:
        raise CommandError(f"APM server {config.server_url} answered HTTP {resp.status}")
    try:
        version = json.loads(resp.data).get("version")
    except (ValueError, AttributeError):
        return None
    return str(version) if version else None
