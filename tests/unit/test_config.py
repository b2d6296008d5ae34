"""Configuration loading: every bad file is refused with file, line and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.config import ConfigError, load_config, parse_config

BAD = Path(__file__).parents[1] / "fixtures" / "configs" / "bad"

# one fixture file per bad case: (file, line, words the reason must contain)
CASES = {
    "yaml_syntax": (3, "YAML syntax error"),
    "unknown_top_level_key": (2, "servr: Extra inputs are not permitted"),
    "unknown_plugin": (3, "no plugin named 'no_such_plugin' is installed"),
    "plugin_schema_violation": (6, "plugins[0].config.rules[0]: Value error, path_prefix"),
    "plugin_unknown_key": (5, "plugins[0].config.colour: Extra inputs are not permitted"),
    "deadline_cannot_fit": (6, "500 ms cannot fit the message budget of 180 ms"),
    "margin_not_below_timeout": (2, "budget_margin_ms must be smaller than message_timeout_ms"),
    "duplicate_instance_names": (4, "plugins[1]: two plugins are named 'headers'"),
    "top_level_not_mapping": (1, "the top level must be a mapping"),
    "wrong_type": (3, "server.message_timeout_ms: Input should be a valid integer"),
    "unsupported_version": (1, "version: Input should be 1"),
    "bad_failure_policy": (4, "plugins[0].fail: Input should be 'open' or 'closed'"),
}


def test_every_fixture_has_a_case() -> None:
    assert {p.stem for p in BAD.glob("*.yaml")} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_config_is_refused_with_file_line_and_reason(name: str) -> None:
    line, reason = CASES[name]
    path = BAD / f"{name}.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    first = info.value.problems[0]
    assert first.startswith(f"{path}:{line}: "), first
    assert reason in first


def test_all_problems_are_reported_at_once() -> None:
    text = "version: 1\nplugins:\n  - plugin: nope\n  - plugin: headers\n    config: {x: 1}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "multi.yaml")
    assert len(info.value.problems) == 2
    assert info.value.problems[0].startswith("multi.yaml:3:")
    assert info.value.problems[1].startswith("multi.yaml:5:")


def test_a_misspelt_key_names_the_key_meant() -> None:
    text = (
        "version: 1\n"
        "servr:\n"
        "  listen: 127.0.0.1:1\n"
        "plugins:\n"
        "  - plugin: rate_limit\n"
        "    config:\n"
        "      rules:\n"
        "        - name: per_subject\n"
        "          match: {path_prefix: /}\n"
        "          key: [subject]\n"
        "          limits: [{requets: 5, per: minute}]\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "typo.yaml")
    first, missing, second = info.value.problems
    assert first == ("typo.yaml:2: servr: Extra inputs are not permitted; did you mean 'server'?")
    # through a list, a plugin's own schema, a list again: the keys of the limit; and no
    # "rules/limits should have at least 1 item" for the lists whose item was invalid
    assert second.startswith("typo.yaml:11: plugins[0].config.rules[0].limits[0].requets: ")
    assert second.endswith("; did you mean 'requests'?")
    assert missing == "typo.yaml:11: plugins[0].config.rules[0].limits[0].requests: Field required"


def test_an_unknown_key_with_no_close_match_lists_the_keys_there() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("server:\n  port: 50051\n", "port.yaml")
    (problem,) = info.value.problems
    assert problem.startswith("port.yaml:2: server.port: Extra inputs are not permitted (the keys")
    assert " listen, " in problem and "transport)" in problem


def test_plugin_sections_are_checked_when_the_server_settings_are_wrong() -> None:
    text = (
        "server:\n"
        "  message_timeout_ms: soon\n"
        "plugins:\n"
        "  - plugin: headers\n"
        "    config: {colour: blue}\n"
        "  - plugin: nope\n"
        "  - plugin: headers\n"
        "    name: h2\n"
        "    priority: high\n"
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "both.yaml")
    lines = [p.split(":")[1] for p in info.value.problems]
    assert lines == ["2", "5", "6", "9"], info.value.problems  # every problem, by line
    assert "plugins[0].config.colour" in info.value.problems[1]
    assert "no plugin named 'nope'" in info.value.problems[2]
    assert "plugins[2].priority: Input should be a valid integer" in info.value.problems[3]


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml: cannot read" in str(info.value)


def test_empty_file_is_a_valid_config_with_no_plugins() -> None:
    loaded = parse_config("", "empty.yaml")
    assert loaded.plugins == ()
    assert loaded.config.server.budget_s == pytest.approx(0.18)


def test_plugin_by_import_path_and_section_digest_tracks_changes() -> None:
    base = "plugins:\n  - plugin: headers\n    config: {request_id_header: %s}\n"
    a = parse_config(base % "x-a")
    b = parse_config(base % "x-a")
    c = parse_config(base % "x-b")
    assert a.section_digest(0) == b.section_digest(0)
    assert a.section_digest(0) != c.section_digest(0)
    direct = parse_config("plugins:\n  - plugin: tests.support.plugins:HangPlugin\n")
    assert direct.plugins[0][1].name == "hang"


def test_the_shipped_default_config_is_valid() -> None:
    from extproc.cli import DEFAULT_DEV_CONFIG

    loaded = load_config(DEFAULT_DEV_CONFIG)
    assert [e.plugin for e, _, _ in loaded.plugins]


OTLP = """version: 1
tracing: {{exporter: otlp, otlp_endpoint: "{endpoint}"}}
metrics: {{otlp_endpoint: "{endpoint}"}}
"""


@pytest.mark.parametrize("endpoint", ["127.0.0.1:4317", "collector:4317", "grpc://c:4317"])
def test_an_otlp_endpoint_must_say_tls_or_not(tmp_path: Path, endpoint: str) -> None:
    """Without a scheme the OpenTelemetry exporter uses TLS, which a plaintext collector
    refuses, and every export fails quietly: refused at load, with the line."""
    config = tmp_path / "extproc.yaml"
    config.write_text(OTLP.format(endpoint=endpoint))
    with pytest.raises(ConfigError) as refused:
        load_config(config)
    text = str(refused.value)
    assert f"{config}:2: tracing.otlp_endpoint" in text, text
    assert f"{config}:3: metrics.otlp_endpoint" in text and "http://HOST:PORT" in text, text


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:4317", "https://collector.example:4317"])
def test_otlp_endpoints_with_a_scheme_are_taken(tmp_path: Path, endpoint: str) -> None:
    config = tmp_path / "extproc.yaml"
    config.write_text(OTLP.format(endpoint=endpoint))
    loaded = load_config(config).config
    assert loaded.tracing.otlp_endpoint == loaded.metrics.otlp_endpoint == endpoint
