"""Schema of the ``headers`` plugin: add, set and remove request and response headers by route."""

from __future__ import annotations

from pydantic import Field, model_validator

from extproc.plugin import PluginConfig

__all__ = ["HeaderRule", "HeadersConfig"]


class HeaderRule(PluginConfig):
    path_prefix: str = Field("/", description="the rule applies below this path")
    methods: tuple[str, ...] = Field((), description="HTTP methods; empty means all")
    request_set: dict[str, str] = Field(default_factory=dict, description="set on the request")
    request_append: dict[str, str] = Field(default_factory=dict, description="append to request")
    request_remove: tuple[str, ...] = Field((), description="remove from the request")
    response_set: dict[str, str] = Field(default_factory=dict, description="set on the response")
    response_remove: tuple[str, ...] = Field((), description="remove from the response")

    @model_validator(mode="after")
    def _check(self) -> HeaderRule:
        if not self.path_prefix.startswith("/"):
            raise ValueError("path_prefix must start with '/'")
        return self


class HeadersConfig(PluginConfig):
    rules: tuple[HeaderRule, ...] = Field((), description="every matching rule applies, in order")
    request_id_header: str | None = Field(
        None, description="copy Envoy's x-request-id into this response header"
    )
