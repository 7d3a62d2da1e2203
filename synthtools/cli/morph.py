"""``synthmorph``: placeholder until its model is trained and shipped."""
from __future__ import annotations

import sys
from typing import NoReturn


def main(argv: list[str] | None = None) -> NoReturn:
    """Parse nothing; report that the model is not available yet (exit 2)."""
    print("synthmorph: error: model not yet available (see issue tracker)", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
