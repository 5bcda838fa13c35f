"""Write docs/reference.md, the configuration reference, from the schema (`jqlora.config.reference`).

    python tools/make_reference.py [--check]

``--check`` writes nothing and exits 1 when the committed file differs (tests/config/test_reference.py does the same).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "docs" / "reference.md"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only say whether docs/reference.md is current")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from jqlora.config.reference import reference_markdown

    text = reference_markdown()
    if args.check:
        current = TARGET.is_file() and TARGET.read_text() == text
        print(f"{TARGET.relative_to(REPO)}: {'current' if current else 'out of date (run python tools/make_reference.py)'}")
        return 0 if current else 1
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
