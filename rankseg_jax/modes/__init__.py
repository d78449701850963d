"""The `main.py --mode=...` commands: each module has `run(config, workdir) -> int`.

User errors are raised (rankseg_jax.errors.UserError); main.py turns them into one line and
exit status 2. The return value is the exit status otherwise (0 ok, 1 nothing written).
"""
