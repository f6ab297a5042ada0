"""What produced a set of weights: users, sample counts, package versions, git commit."""
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("pigg", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "pillow")


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_provenance(path, **facts) -> None:
    record = dict(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), python=platform.python_version(),
                  packages=package_versions(), git_commit=git_commit(), **facts)
    Path(path).write_text(json.dumps(record, indent=1, default=str) + "\n")
