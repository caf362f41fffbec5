"""Reading a bundle folder: its manifest, the files' sha256 and the library versions it needs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import ValidationError

from service.core.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest


class BundleError(RuntimeError):
    """The bundle is missing, tampered with or incompatible; the message says which."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the given distributions ("missing" when absent)."""
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def read_manifest(bundle_dir: str | Path) -> Manifest:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    if not path.is_file():
        raise BundleError(
            f"no {MANIFEST_NAME} in {bundle_dir}: not a model bundle (train one with `python -m training run`)"
        )
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    version_ = raw.get("format_version") if isinstance(raw, dict) else None
    if version_ != FORMAT_VERSION:
        raise BundleError(
            f"bundle format_version {version_} is not supported (this service reads {FORMAT_VERSION}); "
            "retrain the bundle with this version of the training code"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "manifest"
        raise BundleError(f"{path} is not a valid manifest: {where}: {e['msg']}") from None


def bundle_file(bundle_dir: Path, name: str) -> Path:
    """A file inside the bundle folder, refusing anything that resolves outside it (links included)."""
    root = bundle_dir.resolve()
    path = (bundle_dir / name).resolve()
    if path.parent != root:
        raise BundleError(f"bundle file {name} resolves outside {bundle_dir}: refusing to open it")
    return path


def verify_bundle(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Check every file's sha256 and the needed libraries' versions, before anything is unpickled."""
    bundle_dir = Path(bundle_dir)
    for name, digest in manifest.files.items():
        path = bundle_file(bundle_dir, name)
        if not path.is_file():
            raise BundleError(f"bundle file {name} is missing from {bundle_dir}")
        if sha256_file(path) != digest:
            raise BundleError(f"bundle file {name} does not match its sha256 in the manifest: refusing to load it")
    installed = library_versions(manifest.required_libraries)
    for lib in manifest.required_libraries:
        wrote, have = manifest.library_versions[lib], installed[lib]
        if have == "missing":
            raise BundleError(f"bundle needs {lib} (written with {wrote}), which is not installed")
        if wrote.split(".")[:2] != have.split(".")[:2]:
            raise BundleError(f"bundle was written with {lib} {wrote} but {have} is installed; install {lib}=={wrote}")
