"""rankseg_jax entry point: `python main.py --config=configs/demo.py --workdir=DIR [--mode=...]`.

The command line lives in rankseg_jax/cli.py so that `python -m rankseg_jax` runs the same.
"""

from rankseg_jax import cli

if __name__ == "__main__":
    cli.run()
