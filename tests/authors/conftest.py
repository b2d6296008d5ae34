"""The toolkit's fixtures for these tests, also before extproc's ``pytest11`` entry point is
installed (with it, these names simply refer to the same fixtures)."""

from extproc.testing.pytest_plugin import extproc_redis, extproc_stack, fake_envoy, manual_clock

__all__ = ["extproc_redis", "extproc_stack", "fake_envoy", "manual_clock"]
