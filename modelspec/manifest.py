"""The manifest contract of a model version directory. Imports only the standard library.

`manifest.json` lists every other file of the version directory with its sha256, so a reader can
tell a complete, untouched model from a half-copied or edited one before loading anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from modelspec.errors import ManifestError

MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = (
    "name",
    "version",
    "input",
    "outputs",
    "preprocessing",
    "class_names",
    "threshold",
    "forms",
    "files",
)
_CHUNK_BYTES = 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _relative_files(version_dir: Path) -> list[str]:
    """Relative POSIX paths of every regular file except the manifest, sorted."""
    names = (path.relative_to(version_dir).as_posix() for path in version_dir.rglob("*") if path.is_file())
    return sorted(name for name in names if name != MANIFEST_NAME)


def hash_tree(version_dir: Path) -> dict[str, str]:
    """Relative POSIX path -> sha256 for every regular file except the manifest."""
    version_dir = Path(version_dir)
    return {name: sha256_file(version_dir / name) for name in _relative_files(version_dir)}


def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json with a fresh `files` table; replace so readers never see half a file."""
    version_dir = Path(version_dir)
    content = dict(manifest, files=hash_tree(version_dir))
    target = version_dir / MANIFEST_NAME
    partial = version_dir / f".{MANIFEST_NAME}.partial"
    partial.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, target)
    return target


def load_manifest(version_dir: Path) -> dict[str, Any]:
    """Read and sanity-check manifest.json (keys only; use verify_manifest to check the files)."""
    path = Path(version_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path} does not exist: {version_dir} is not a finished model version "
            "(build one with `python -m modelkit build-demo` or `python -m modelkit train`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} does not hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ManifestError(f"{path} lacks required keys: {', '.join(missing)}")
    return manifest


def verify_manifest(version_dir: Path) -> dict[str, Any]:
    """Recompute every hash; raise ManifestError naming the first file that is missing,
    differs, or is not listed. Returns the manifest when everything matches."""
    version_dir = Path(version_dir)
    manifest = load_manifest(version_dir)
    listed: dict[str, str] = manifest["files"]
    for relative, expected in listed.items():
        path = version_dir / relative
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        if sha256_file(path) != expected:
            raise ManifestError(f"{path} differs from the manifest (sha256 mismatch)")
    # An unlisted file means someone copied into or over this version after it was built.
    unlisted = sorted(set(_relative_files(version_dir)) - set(listed))
    if unlisted:
        raise ManifestError(
            f"{version_dir / unlisted[0]} is not listed in the manifest"
            + (f" (and {len(unlisted) - 1} more unlisted files)" if len(unlisted) > 1 else "")
        )
    for form, relative in manifest["forms"].items():
        if not (version_dir / relative).exists():
            raise ManifestError(f"form {form!r} points at {version_dir / relative}, which is missing")
    return manifest


def form_path(version_dir: Path, manifest: dict[str, Any], form: str) -> Path:
    """Absolute path of one model form (e.g. 'openvino_fp32'), with the available forms on error."""
    forms: dict[str, str] = manifest["forms"]
    if form not in forms:
        raise ManifestError(
            f"model {manifest['name']}/{manifest['version']} has no form {form!r} "
            f"(available: {', '.join(sorted(forms))})"
        )
    return Path(version_dir) / forms[form]
