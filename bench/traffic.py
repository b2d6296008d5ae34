"""The traffic mix, alike for every scenario: ``GET /api/items/<n>`` with a distinct RS256
token per subject (``Authorization: Bearer``), 1,000 subjects by default, taken round robin
(each wrk connection starts at its own offset), so the JWT caches and the per-user limits see
many keys, as in production. Scenarios that do not check tokens get the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AUDIENCE", "ISSUER", "Traffic", "make_traffic"]

ISSUER = "https://issuer.bench/"
AUDIENCE = "api"


@dataclass(frozen=True)
class Traffic:
    jwks: dict[str, Any]
    tokens: tuple[str, ...]

    def path(self, i: int) -> str:
        return f"/api/items/{i % 97}"

    def raw_request(self, i: int, host: str) -> bytes:
        """Request ``i`` as HTTP/1.1 bytes (keep-alive)."""
        token = self.tokens[i % len(self.tokens)]
        return (
            f"GET {self.path(i)} HTTP/1.1\r\nhost: {host}\r\n"
            f"authorization: Bearer {token}\r\nuser-agent: bench\r\n\r\n"
        ).encode()

    def write_wrk_script(self, directory: Path) -> Path:
        """A wrk Lua script that sends this mix and counts responses by status."""
        tokens = directory / "tokens.txt"
        tokens.write_text("\n".join(self.tokens) + "\n")
        script = directory / "mix.lua"
        script.write_text(_WRK_LUA.replace("@TOKENS@", json.dumps(str(tokens))))
        return script


def make_traffic(subjects: int = 1000, lifetime_s: int = 6 * 3600) -> Traffic:
    from extproc.testing.jwt import TokenFactory, jwks_document, make_rsa_key

    key = make_rsa_key("bench-rs256")
    factory = TokenFactory(key, issuer=ISSUER, audience=AUDIENCE, lifetime=lifetime_s)
    tokens = tuple(factory.mint({"sub": f"user-{i:05d}"}) for i in range(subjects))
    return Traffic(jwks=jwks_document([key]), tokens=tokens)


# wrk's Lua API: setup(thread) runs in the main state per thread; init/request/response run in
# each thread's own state; done() runs in the main state after the run, reading the threads'
# globals back with thread:get. Requests are formatted once, in init.
_WRK_LUA = r"""
local threads = {}
local counter = 0

function setup(thread)
  thread:set("offset", counter * 131)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  reqs = {}
  local i = 0
  for token in io.lines(@TOKENS@) do
    if #token > 0 then
      reqs[#reqs + 1] = wrk.format("GET", "/api/items/" .. (i % 97),
        {["authorization"] = "Bearer " .. token, ["user-agent"] = "bench"})
      i = i + 1
    end
  end
  n = offset % #reqs
end

function request()
  n = n + 1
  if n > #reqs then n = 1 end
  return reqs[n]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, count in pairs(s) do
      merged[tostring(code)] = (merged[tostring(code)] or 0) + count
    end
  end
  local parts = {}
  for code, count in pairs(merged) do
    parts[#parts + 1] = string.format('"%s": %d', code, count)
  end
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50": %d, "p90": %d, "p99": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    table.concat(parts, ", ")))
end
"""
