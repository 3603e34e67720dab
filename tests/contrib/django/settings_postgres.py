"""The test project on PostgreSQL (psycopg): the server's login as JSON in SHOP_POSTGRES, from
tests/databases.py's `postgres` fixture."""

import json
import os

from tests.contrib.django.settings import *  # noqa: F403

_login = json.loads(os.environ["SHOP_POSTGRES"])
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": _login["host"],
        "PORT": _login["port"],
        "USER": _login["user"],
        "PASSWORD": _login["password"],
        "NAME": _login["dbname"],
    }
}
