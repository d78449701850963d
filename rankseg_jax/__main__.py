"""`python -m rankseg_jax --config=... --workdir=...`: the same command line as main.py."""

from rankseg_jax import cli

if __name__ == "__main__":
    cli.run()
