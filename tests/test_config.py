"""Config: parsers, env-over-keyword precedence, defaults, and ConfigError messages."""

import logging
import re

import pytest

from beatlib import config as config_module
from beatlib.config import SERVICE_NAME_FALLBACK, Config, ConfigError, default_service_name

EMPTY: dict[str, str] = {}  # an environment with no BEATLIB_* variables


def make(**kwargs: object) -> Config:
    return Config(environ=EMPTY, **kwargs)


def rejects(name: str, value: object, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Config(environ=environ or EMPTY, **({} if environ else {name: value}))
    error = caught.value
    assert error.setting == name
    assert str(error).startswith(f"{name}: {value!r}")
    return error


EXPECTED_DEFAULTS = {
    "service_version": None,
    "environment": None,
    "hostname": None,
    "server_url": "http://127.0.0.1:8200",
    "secret_token": None,
    "api_key": None,
    "exporter": "intake",
    "otlp_endpoint": "http://127.0.0.1:4318",
    "otlp_headers": {},
    "enabled": True,
    "exporter_process": False,
    "transaction_sample_rate": 1.0,
    "transaction_max_spans": 500,
    "flush_interval": 10.0,
    "max_request_size": 768 * 1024,
    "max_queue_events": 10000,
    "max_buffer_size": 32 * 1024 * 1024,
    "server_timeout": 5.0,
    "shutdown_timeout": 5.0,
    "verify_server_cert": True,
    "server_ca_cert_file": None,
    "capture_locals": True,
    "source_lines_error_app_frames": 5,
    "source_lines_error_library_frames": 0,
    "local_var_max_length": 200,
    "local_var_list_max_length": 10,
    "local_var_dict_max_length": 10,
    "max_string_length": 1024,
    "max_message_length": 10000,
    "stack_trace_limit": 50,
    "include_paths": (),
    "exclude_paths": (),
    "span_stack_trace_min_duration": -1.0,
    "log_level": None,
    "instrument": True,
    "disabled_instrumentations": (),
    "capture_body": "off",
    "capture_headers": True,
    "transaction_ignore_urls": (),
    "assign_errors": True,
}


def test_defaults_match_the_list():
    config = make()
    for name, expected in EXPECTED_DEFAULTS.items():
        assert getattr(config, name) == expected, name
    assert re.fullmatch(r"[A-Za-z0-9 _-]+", config.service_name)
    for pattern in ("*password*", "*secret*", "*token*", "*auth*", "*cookie*", "*signature*"):
        assert pattern in config.sanitize_field_names
    assert config.sanitize_field_names_extra == () and config.capture_sql_literals is False
    assert config.before_send is None


def test_settings_lists_every_attribute_with_doc_and_env_var():
    settings = Config.settings()
    assert settings[0].name == "service_name"
    assert {s.name for s in settings} == {"service_name", "sanitize_field_names",
                                          "sanitize_field_names_extra", "capture_sql_literals",
                                          "before_send", *EXPECTED_DEFAULTS}
    for s in settings:
        assert s.doc and s.parser.accepts and s.type
        assert s.env_var == "BEATLIB_" + s.name.upper()
    secrets = {s.name for s in settings if s.secret}
    assert secrets == {"secret_token", "api_key", "otlp_headers"}
    assert {s.name: s.default for s in settings}["flush_interval"] == "10s"


def test_attributes_are_slots():
    config = make()
    assert not hasattr(config, "__dict__")
    config.flush_interval = 1.0  # tests and callers may still adjust a value
    assert config.flush_interval == 1.0


# --- parsers -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), ("true", True), ("FALSE", False), ("1", True), ("0", False),
    ("yes", True), ("No", False), (" on ", True), ("off", False), (1, True), (0, False),
])
def test_boolean(value, expected):
    assert make(enabled=value).enabled is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, 1.0, None, []])
def test_boolean_rejects(value):
    assert "a boolean" in str(rejects("enabled", value))


@pytest.mark.parametrize("value, expected", [(7, 7), ("7", 7), (" 12 ", 12), (0, 0)])
def test_integer(value, expected):
    assert make(transaction_max_spans=value).transaction_max_spans == expected


@pytest.mark.parametrize("name, value", [
    ("transaction_max_spans", -1), ("transaction_max_spans", "5.0"),
    ("transaction_max_spans", 5.5), ("transaction_max_spans", True),
    ("transaction_max_spans", "many"), ("max_queue_events", 0), ("stack_trace_limit", -2),
    ("local_var_max_length", 0),
])
def test_integer_rejects(name, value):
    assert "an integer >=" in str(rejects(name, value))


@pytest.mark.parametrize("value, expected", [
    (0, 0.0), (1, 1.0), ("0.5", 0.5), (0.123456, 0.1235), (" 0.25 ", 0.25),
    # half away from zero on the decimal digits written, and never down to 0
    (0.33335, 0.3334), ("0.66665", 0.6667), (0.33334, 0.3333), (0.00001, 0.0001),
    ("0.00004", 0.0001), (0.99999, 1.0),
])
def test_sample_rate(value, expected):
    assert make(transaction_sample_rate=value).transaction_sample_rate == expected


@pytest.mark.parametrize("value", [1.5, -0.1, "2", "nan", "half", True, None])
def test_sample_rate_rejects(value):
    assert "a number from 0 to 1" in str(rejects("transaction_sample_rate", value))


@pytest.mark.parametrize("value, expected", [
    ("10s", 10.0), ("500ms", 0.5), ("2m", 120.0), ("1.5s", 1.5), ("1h", 3600.0),
    ("10S", 10.0), (" 3 s ", 3.0), ("250MS", 0.25), (2.5, 2.5), (3, 3.0),
])
def test_duration(value, expected):
    assert make(flush_interval=value).flush_interval == expected


@pytest.mark.parametrize("value", [
    "10", "1.5", "10 parsecs", "-1s", "s", "0", 0, "0s", -1, float("inf"), True, None,
])
def test_duration_rejects(value):
    error = rejects("flush_interval", value)
    assert 'a duration (use e.g. "10s", "500ms", "2m"' in str(error)


@pytest.mark.parametrize("value, expected", [("0", 0.0), (0, 0.0), ("0s", 0.0), ("2s", 2.0)])
def test_duration_zero_where_allowed(value, expected):
    assert make(shutdown_timeout=value).shutdown_timeout == expected


@pytest.mark.parametrize("value", ["-1", -1, -0.5])
def test_duration_zero_allowed_but_not_off(value):
    rejects("shutdown_timeout", value)


@pytest.mark.parametrize("value, expected", [
    ("-1", -1.0), (-1, -1.0), ("0", 0.0), (0, 0.0), ("5ms", 0.005), (0.01, 0.01),
])
def test_duration_off(value, expected):
    config = make(span_stack_trace_min_duration=value)
    assert config.span_stack_trace_min_duration == expected


@pytest.mark.parametrize("value", ["-2", -0.5, "5"])
def test_duration_off_rejects(value):
    error = rejects("span_stack_trace_min_duration", value)
    assert "-1 to turn it off" in str(error)


@pytest.mark.parametrize("value, expected", [
    ("768kb", 768 * 1024), ("1mb", 1024**2), ("2048b", 2048), ("1GB", 1024**3),
    ("1.5kb", 1536), (" 4 KB ", 4096), (4096, 4096),
])
def test_size(value, expected):
    assert make(max_request_size="1kb", max_buffer_size=value).max_buffer_size == expected


@pytest.mark.parametrize("value", ["1024", "1tb", "lots", "10 parsecs", 100, "1b", 1.5, True, None])
def test_size_rejects(value):
    assert 'a size (use e.g. "768kb"' in str(rejects("max_request_size", value))


def test_buffer_must_hold_one_request():
    with pytest.raises(ConfigError) as caught:
        make(max_request_size="1mb", max_buffer_size="512kb")
    assert caught.value.setting == "max_buffer_size"
    assert "max_request_size" in str(caught.value)


@pytest.mark.parametrize("value, expected", [
    ("myapp, lib.sub,,", ("myapp", "lib.sub")), (["a", " b "], ("a", "b")), (("x",), ("x",)),
    ("", ()), ([], ()),
])
def test_list(value, expected):
    assert make(include_paths=value).include_paths == expected


def test_sanitize_field_names_keep_their_case():  # matching is case-insensitive; (?-i) is not
    config = make(sanitize_field_names="Password, (?-i)X-API-KEY")
    assert config.sanitize_field_names == ("Password", "(?-i)X-API-KEY")


@pytest.mark.parametrize("value", [5, [1, 2], {"a"}, None])
def test_list_rejects(value):
    assert "comma-separated" in str(rejects("exclude_paths", value))


@pytest.mark.parametrize("value, expected", [
    ("http://127.0.0.1:8200/", "http://127.0.0.1:8200"), ("https://apm.example.com", None),
    (" http://apm:8200/base// ", "http://apm:8200/base"),
])
def test_url(value, expected):
    assert make(server_url=value).server_url == (expected or value)


@pytest.mark.parametrize("value", [
    "ftp://apm:21", "127.0.0.1:8200", "http://", "http://apm:99999", "http://apm:port", 8200,
    "", None,
])
def test_url_rejects(value):
    assert "an http(s) URL with a host" in str(rejects("server_url", value))


@pytest.mark.parametrize("value, expected", [
    ("DEBUG", "debug"), ("warning", "warning"), ("", None), (None, None),
])
def test_log_level(value, expected):
    assert make(log_level=value).log_level == expected


@pytest.mark.parametrize("value", ["loud", "warn", 10])
def test_log_level_rejects(value):
    assert "one of debug, info, warning, error, critical" in str(rejects("log_level", value))


@pytest.mark.parametrize("value", [1, b"bytes"])
def test_optional_text_rejects(value):
    assert "a string" in str(rejects("environment", value))


# --- service_name ------------------------------------------------------------------------------

@pytest.mark.parametrize("main_file, expected", [
    ("/srv/billing/worker.py", "worker"),
    ("/srv/shop/manage.py", "shop"),
    ("/srv/my.site/manage.py", "my_site"),
    ("/opt/tools/reports/__main__.py", "reports"),
    ("/usr/bin/celery", "celery"),
    ("-c", SERVICE_NAME_FALLBACK),
    ("", SERVICE_NAME_FALLBACK),
    ("/manage.py", SERVICE_NAME_FALLBACK),
])
def test_default_service_name(main_file, expected):
    assert default_service_name(main_file) == expected


def test_explicit_service_name():
    assert make(service_name="my shop_1-a").service_name == "my shop_1-a"


@pytest.mark.parametrize("value", ["my.app", "shop/1", "café", 42])
def test_service_name_rejects(value):
    error = rejects("service_name", value)
    assert "letters, digits, spaces, _ and -" in str(error)


# --- sources and precedence ------------------------------------------------------------------

def test_env_wins_over_keyword():
    environ = {"BEATLIB_FLUSH_INTERVAL": "1.5s", "BEATLIB_ENABLED": "off",
               "BEATLIB_SERVICE_NAME": "from-env", "BEATLIB_SANITIZE_FIELD_NAMES": "a,B"}
    config = Config(environ=environ, flush_interval="2m", enabled=True, service_name="kw")
    assert config.flush_interval == 1.5
    assert config.enabled is False
    assert config.service_name == "from-env"
    assert config.sanitize_field_names == ("a", "B")


def test_empty_env_var_counts_as_unset():
    config = Config(environ={"BEATLIB_ENVIRONMENT": "", "BEATLIB_FLUSH_INTERVAL": ""},
                    environment="prod")
    assert config.environment == "prod"
    assert config.flush_interval == 10.0


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("BEATLIB_SERVICE_VERSION", "1.2.3")
    assert Config().service_version == "1.2.3"


def test_bad_env_value_names_the_env_var():
    error = rejects("flush_interval", "10 parsecs", {"BEATLIB_FLUSH_INTERVAL": "10 parsecs"})
    assert error.env_var == "BEATLIB_FLUSH_INTERVAL"
    assert str(error) == ("flush_interval: '10 parsecs' (from BEATLIB_FLUSH_INTERVAL) is not a "
                          'duration (use e.g. "10s", "500ms", "2m"; more than 0)')
    assert rejects("flush_interval", "soon").env_var is None


def test_unknown_keyword():
    with pytest.raises(ConfigError) as caught:
        make(flush_intervl="10s")
    assert caught.value.setting == "flush_intervl"
    assert "unknown setting 'flush_intervl'" in str(caught.value)
    assert "did you mean 'flush_interval'" in str(caught.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        make(enabled="maybe")


def test_from_mapping_accepts_either_case_and_env_wins():
    config = Config.from_mapping(
        {"SERVICE_NAME": "shop", "server_url": "https://apm:8200", "FLUSH_INTERVAL": "2s"},
        environ={"BEATLIB_FLUSH_INTERVAL": "3s"},
    )
    assert (config.service_name, config.server_url, config.flush_interval) == (
        "shop", "https://apm:8200", 3.0)


@pytest.mark.parametrize("mapping, setting", [
    ({"SERVCE_NAME": "x"}, "servce_name"),
    ({"environ": {}}, "environ"),
    ({"enabled": True, "ENABLED": False}, "enabled"),
    ({"MAX_QUEUE_EVENTS": "-5"}, "max_queue_events"),
])
def test_from_mapping_rejects(mapping, setting):
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping(mapping, environ=EMPTY)
    assert caught.value.setting == setting
    assert setting in str(caught.value)


# --- secrets -----------------------------------------------------------------------------------

def test_repr_hides_secrets():
    for bad in ("tok en", "tok\nen", "tök"):
        with pytest.raises(ConfigError) as error:
            make(secret_token=bad)
        assert error.value.setting == "secret_token" and bad not in str(error.value)
    config = make(secret_token="s3cr3t-token", api_key="k3y-value", environment="prod")
    text = repr(config)
    assert "s3cr3t" not in text and "k3y" not in text
    assert "secret_token='***'" in text and "api_key='***'" in text
    assert "environment='prod'" in text
    assert "api_key=None" in repr(make())


def test_error_hides_secret_values():
    with pytest.raises(ConfigError) as caught:
        make(api_key=12345)
    assert caught.value.setting == "api_key"
    assert "12345" not in str(caught.value)


def test_equal_settings_make_equal_configs():
    assert make(service_name="a") == make(service_name="a")
    assert make(service_name="a") != make(service_name="b")


def test_huge_number_is_a_config_error():
    rejects("flush_interval", 10**400)


def test_a_mistyped_environment_variable_is_warned_about_with_the_setting_meant(caplog,
                                                                              monkeypatch):
    monkeypatch.setattr(config_module, "_warned_env", set())  # as in a fresh process
    environ = {"BEATLIB_SAMPLE_RATE": "2", "BEATLIB_SERVCE_NAME": "x", "BEATLIB_ZZZ_QQQ": "1",
               "BEATLIB_SERVE_NOTIFY_WEBHOOK": "http://127.0.0.1:9/hook"}  # beatlib serve's
    with caplog.at_level(logging.WARNING, logger="beatlib"):
        config = Config(environ=environ)
        Config(environ=environ)  # once per process, not per client
    assert config.transaction_sample_rate == 1.0  # ignored, as before, but not silently
    assert config_module.unknown_env_vars(environ) == [
        ("BEATLIB_SAMPLE_RATE", "BEATLIB_TRANSACTION_SAMPLE_RATE"),
        ("BEATLIB_SERVCE_NAME", "BEATLIB_SERVICE_NAME"), ("BEATLIB_ZZZ_QQQ", None)]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert any("BEATLIB_SAMPLE_RATE" in m and "BEATLIB_TRANSACTION_SAMPLE_RATE" in m
               for m in messages)
