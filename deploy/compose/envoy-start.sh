#!/bin/sh
# Starts Envoy in the compose stack from the repository's envoy/envoy.yaml, mounted unchanged.
#
# envoy.yaml binds its HTTP listener to 127.0.0.1:10000: right on one machine, but a
# published container port reaches the container's network interface, never its loopback. So
# the copy Envoy loads differs in exactly one line: that listener binds 0.0.0.0 (the cluster
# endpoints 127.0.0.1:50051 and 127.0.0.1:8080 stay as they are: the sidecar and the demo
# upstream share this network namespace). envoy-overrides.yaml then adds a read-only admin
# listener on :9902 for Prometheus. tests/unit/test_deploy.py runs this script against the real
# Envoy binary (--mode validate).
#
# Environment (defaults are the container paths docker-compose.yml mounts):
#   ENVOY_BIN        envoy
#   ENVOY_CONFIG     /etc/envoy/envoy.yaml
#   ENVOY_OVERRIDES  /etc/envoy/compose/envoy-overrides.yaml
#   ENVOY_RUN_DIR    /tmp                 (where the effective config is written)
# Extra arguments are passed to Envoy.
set -eu

bin="${ENVOY_BIN:-envoy}"
src="${ENVOY_CONFIG:-/etc/envoy/envoy.yaml}"
overrides="${ENVOY_OVERRIDES:-/etc/envoy/compose/envoy-overrides.yaml}"
out="${ENVOY_RUN_DIR:-/tmp}/envoy.yaml"

sed -E 's/^([[:space:]]*socket_address: \{ *address: *)127\.0\.0\.1(, *port_value: *10000 *\})/\10.0.0.0\2/' \
    "$src" > "$out"
if [ "$(grep -cE 'address: *0\.0\.0\.0, *port_value: *10000' "$out")" != 1 ]; then
    echo "envoy-start.sh: expected exactly one listener on port 10000 in $src" >&2
    exit 1
fi

exec "$bin" -c "$out" --config-yaml "$(cat "$overrides")" "$@"
