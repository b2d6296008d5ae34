"""Schema of the ``json_validator`` plugin: reading this file tells you everything it can do.

Each *route* (path prefix + methods) describes the JSON object its requests must send: the
fields that are ``required`` and the JSON type of each field in ``properties``. The first route
that matches a request applies; a request no route matches is not checked.

Example::

    routes:
      - path_prefix: /orders
        methods: [POST, PUT]
        required: [item, quantity]
        properties: {item: string, quantity: integer, note: [string, "null"]}
        additional_properties: false
"""

from __future__ import annotations

from typing import Literal

from extproc.plugin import PluginConfig
from pydantic import Field, field_validator, model_validator

__all__ = ["JsonType", "JsonValidatorConfig", "Route"]

JsonType = Literal["string", "number", "integer", "boolean", "object", "array", "null"]


class Route(PluginConfig):
    path_prefix: str = Field("/", description="requests below this path are checked")
    methods: tuple[str, ...] = Field(
        ("POST", "PUT", "PATCH"), min_length=1, description="HTTP methods checked"
    )
    required: tuple[str, ...] = Field((), description="fields the object must have")
    properties: dict[str, JsonType | tuple[JsonType, ...]] = Field(
        default_factory=dict, description="field -> its JSON type (or a list of allowed types)"
    )
    additional_properties: bool = Field(True, description="allow fields not in `properties`")

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(m.upper() for m in value)

    @model_validator(mode="after")
    def _required_known(self) -> Route:
        if not self.additional_properties:
            unknown = [f for f in self.required if f not in self.properties]
            if unknown:
                raise ValueError(
                    f"required fields {unknown} are not in `properties`, and "
                    "additional_properties is false: no body could pass"
                )
        return self


class JsonValidatorConfig(PluginConfig):
    routes: tuple[Route, ...] = Field(min_length=1, description="the first match applies")
    max_body_bytes: int = Field(
        64 * 1024,
        ge=2,
        le=1024 * 1024,
        description="larger bodies are refused with 413 (also bounds the CPU spent parsing)",
    )
    max_depth: int = Field(
        16, ge=1, le=64, description="deepest nesting of objects/arrays accepted"
    )
    require_json_content_type: bool = Field(
        True, description="refuse (415) a checked request whose content-type is not JSON"
    )
    max_errors: int = Field(10, ge=1, le=100, description="problems listed in a 400 answer")
