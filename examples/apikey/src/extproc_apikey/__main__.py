"""``python -m extproc_apikey hash KEY`` / ``python -m extproc_apikey new OWNER``.

``hash`` prints the SHA-256 to put in the config or in Redis; ``new`` makes a random key and
prints the key (give it to the client, once) and the config entry (keep that).
"""

from __future__ import annotations

import secrets
import sys

from extproc_apikey.config import hash_key


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "hash":
        print(hash_key(argv[1]))
        return 0
    if len(argv) == 2 and argv[0] == "new":
        key = secrets.token_urlsafe(32)
        print(f"key (give it to {argv[1]}, it is not stored anywhere): {key}")
        print(f"config:  - {{sha256: {hash_key(key)}, owner: {argv[1]}}}")
        print(f"redis:   SET apikey:{hash_key(key)} {argv[1]}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
