"""Load harness: Envoy passthrough vs Envoy's native filters vs bare grpc.aio servicers vs
extproc vs envoy-extproc-sdk, on one machine in one run. Entry point: ``python -m bench.run``."""
