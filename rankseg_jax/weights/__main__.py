"""``python -m rankseg_jax.weights [list | fetch NAME... | path NAME]``: the weights registry.

``list`` (the default) prints one line per name: format, whether it is cached, the config it
goes with. ``fetch`` downloads (or verifies the cached copy) and prints the local path, so
scripts can use ``$(python -m rankseg_jax.weights fetch augreg_vit_b16_384)``. ``path`` prints
where a name is cached without downloading. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from rankseg_jax import weights
from rankseg_jax.download import DownloadError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rankseg_jax.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("list", help="list the registered names (default)")
    fetch = sub.add_parser("fetch", help="download NAME(s) into the cache, print the paths")
    fetch.add_argument("names", nargs="+")
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    path = sub.add_parser("path", help="print where NAME is cached (no download)")
    path.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            for name in args.names:
                print(weights.fetch(name, progress=not args.quiet))
        elif args.command == "path":
            print(weights.cached_path(args.name))
        else:
            width = max(map(len, weights.names()))
            for name in weights.names():
                entry = weights.get(name)
                cached = "cached" if weights.cached_path(name).is_file() else "-"
                print(f"{name:<{width}}  {entry.format:<13}  {cached:<6}  {entry.config}")
    except DownloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
