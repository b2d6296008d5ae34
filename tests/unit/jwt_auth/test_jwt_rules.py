"""Path normalisation and rule matching: every bypass trick gets at least the rule it aims to
dodge (the strictest rule across all readings of the path)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.jwt_auth.config import Requirement, Rule
from plugins.jwt_auth.rules import BadPathError, RuleSet, path_readings

RULES = [
    Rule.model_validate({"match": {"prefix": "/public/"}, "requires": {"allow_missing": True}}),
    Rule.model_validate(
        {"match": {"path": "/health"}, "requires": {"allow_missing_or_failed": True}}
    ),
    Rule.model_validate(
        {"match": {"prefix": "/admin"}, "requires": {"provider": "p"}, "scopes": ["admin"]}
    ),
    Rule.model_validate(
        {
            "match": {"regex": r"/files/[0-9]+", "methods": ["DELETE"]},
            "requires": {"provider": "p"},
            "roles": ["owner"],
        }
    ),
    Rule.model_validate(
        {
            "match": {"prefix": "/docs/", "case_sensitive": False},
            "requires": {"allow_missing": True},
        }
    ),
]
RULESET = RuleSet(RULES, Requirement(provider="p"), ["p"])
PUBLIC, HEALTH, ADMIN, FILES, DOCS, DEFAULT = 0, 1, 2, 3, 4, 5


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/public/a", PUBLIC),
        ("GET", "/health", HEALTH),
        ("GET", "/admin", ADMIN),
        ("GET", "/other", DEFAULT),
        # dot segments
        ("GET", "/public/../admin", ADMIN),
        ("GET", "/public/./../admin/x", ADMIN),
        ("GET", "/../../admin", ADMIN),
        ("GET", "/public/%2e%2e/admin", ADMIN),
        ("GET", "/public/%2E%2E/admin", ADMIN),
        ("GET", "/public/.%2e/admin", ADMIN),
        # merged slashes
        ("GET", "//admin", ADMIN),
        ("GET", "/public//../admin", ADMIN),
        # encoded slashes and backslashes
        ("GET", "/public%2F..%2Fadmin", ADMIN),
        ("GET", "/public%2f..%2fadmin", ADMIN),
        ("GET", "/public\\..\\admin", ADMIN),
        ("GET", "/public%5C..%5Cadmin", ADMIN),
        # double encoding
        ("GET", "/public/%252e%252e/admin", ADMIN),
        ("GET", "/public%252F..%252Fadmin", ADMIN),
        # ;params (Tomcat/Jetty path parameters)
        ("GET", "/public/..;/admin", ADMIN),
        ("GET", "/public;x=1/../admin", ADMIN),
        ("GET", "/admin;jsessionid=1", ADMIN),
        # a server that keeps ;x sees another path: the default (stricter) applies
        ("GET", "/health;x", DEFAULT),
        # case
        ("GET", "/ADMIN", ADMIN),
        ("GET", "/Admin/users", ADMIN),
        ("GET", "/PUBLIC/../ADMIN", ADMIN),
        ("GET", "/DOCS/a", DOCS),
        # trailing slash: one reading is the loose exact match, the other the strict default
        ("GET", "/health/", DEFAULT),
        # methods, case-insensitively
        ("DELETE", "/files/12", FILES),
        ("delete", "/files/12", FILES),
        ("GET", "/files/12", DEFAULT),
        ("DELETE", "/files/12/", FILES),
        ("DELETE", "/files/%31%32", FILES),
        # an encoded dot inside a public prefix that stays public
        ("GET", "/public/a%2Eb", PUBLIC),
    ],
)
def test_rule_matching(method: str, path: str, expected: int) -> None:
    assert RULESET.match(method, path).index == expected


@pytest.mark.parametrize(
    "path", ["", "admin", "/a%00", "/a%zz", "/a%2", "/a\x00", "/a\n", "/" + "a" * 9000]
)
def test_malformed_paths_raise(path: str) -> None:
    with pytest.raises(BadPathError):
        RULESET.match("GET", path)


def test_asterisk_form_goes_to_default() -> None:
    assert RULESET.match("OPTIONS", "*").index == DEFAULT


def test_readings_fast_path_is_single() -> None:
    assert path_readings("/api/v1/items") == ("/api/v1/items",)
    assert path_readings("/public/../admin") == ("/admin",)


def test_strictest_wins_over_first_reading() -> None:
    # the literal reading matches the public prefix, the decoded one the admin rule
    rule = RULESET.match("GET", "/public%2F..%2Fadmin")
    assert rule.level == 3 and rule.scopes == ("admin",)


@settings(max_examples=300, derandomize=True)
@given(st.text(alphabet=st.sampled_from(list("/.;%2Ee5cCfF\\aA")), max_size=30))
def test_matcher_only_raises_bad_path(path: str) -> None:
    try:
        rule = RULESET.match("GET", "/" + path)
    except BadPathError:
        return
    # anything that resolves onto /admin gets the admin rule (or stricter)
    if "/admin" in path_readings("/" + path):
        assert rule.strictness >= RULESET.rules[ADMIN].strictness
