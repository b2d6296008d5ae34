"""Validate JSON request bodies against a small schema, before they reach the upstream."""

from extproc_json_validator.config import JsonValidatorConfig, Route
from extproc_json_validator.plugin import JsonValidatorPlugin
from extproc_json_validator.schema import Problem, validate

__all__ = ["JsonValidatorConfig", "JsonValidatorPlugin", "Problem", "Route", "validate"]
