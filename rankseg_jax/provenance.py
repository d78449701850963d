"""What a run records about itself in its workdir, and the guard against resuming a different run.

`<workdir>/config.json` holds the resolved config; `<workdir>/provenance.json` the git revision,
package versions, devices and seed of each start. A restart whose `model` or `data` config
differs from the saved one refuses to resume unless `logging.resume_mismatch_ok` is set.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections

from rankseg_jax.errors import ConfigError

GUARDED_KEYS = ("model", "data")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "clu")


def git_revision() -> str:
    repo = pathlib.Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _plain(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} → {b!r}")
    return diffs


def check_resume(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Raise ConfigError if the workdir's saved model/data config differs."""
    path = workdir / "config.json"
    if not path.exists() or config.logging.resume_mismatch_ok:
        return
    saved, current = json.loads(path.read_text()), _plain(config)
    diffs = []
    for key in GUARDED_KEYS:
        diffs += _differences(saved.get(key, {}), current[key], f"{key}.")
    if diffs:
        raise ConfigError(
            f"{workdir} holds a run with a different config ({'; '.join(diffs[:5])}); "
            "use another --workdir or set --config.logging.resume_mismatch_ok=True"
        )


def _write_json(path: pathlib.Path, value) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def record(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    origin: str,
    *,
    sha256: str | None = None,
) -> None:
    """Write config.json and append this start to provenance.json (process 0 only).

    `origin`: what the state came from ("random init (seed N)", "checkpoint step N", or the
    weights file loaded); `sha256`: that file's digest, recorded as `weights_sha256`.
    """
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json(workdir / "config.json", _plain(config))
    path = workdir / "provenance.json"
    starts = json.loads(path.read_text()) if path.exists() else []
    starts.append(
        dict(
            time=datetime.datetime.now(datetime.UTC).isoformat(),
            git=git_revision(),
            versions=package_versions(),
            devices=[str(d) for d in jax.devices()],
            process_count=jax.process_count(),
            seed=config.seed,
            weights=origin,
            weights_sha256=sha256,
            argv=sys.argv,
        )
    )
    _write_json(path, starts)
