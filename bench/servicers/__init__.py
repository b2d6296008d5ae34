"""Bare ext_proc servicers that answer CONTINUE and nothing else: the yardsticks extproc is
measured against. Each runs as its own process (``python -m bench.servicers.bare``)."""
