"""Reading a bundle folder: its manifest, its optional signature, the files' sha256 and the
library versions it needs. Only files listed and hashed in the manifest are ever opened, by plain
names inside the folder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pydantic import ValidationError

from service.core.errors import BundleError
from service.core.manifest import MANIFEST_NAME, READABLE_VERSIONS, Manifest
from service.core.signing import verify_signature

__all__ = ["BundleError", "check_libraries", "read_manifest", "read_verified", "verify_bundle"]


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def library_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of the given libraries ("missing" when absent), by distribution name.
    A `<name>-cpu` distribution counts as `<name>`: the serving image installs xgboost-cpu, the same
    library without the NVIDIA NCCL wheel, and bundles name it by its library."""
    out = {}
    for name in names:
        out[name] = "missing"
        for dist in (name, f"{name}-cpu"):
            try:
                out[name] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def read_manifest(bundle_dir: str | Path, public_key_pem: bytes | None = None) -> Manifest:
    """The manifest, parsed from one read of its bytes; with a public key, those bytes must carry
    a valid signature."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_NAME
    if not bundle_dir.is_dir():
        raise BundleError(f"bundle directory {bundle_dir} does not exist")
    if not path.is_file():
        raise BundleError(
            f"no {MANIFEST_NAME} in {bundle_dir}: not a model bundle (train one with `python -m training run`)"
        )
    data = path.read_bytes()
    if public_key_pem is not None:
        verify_signature(bundle_dir, data, public_key_pem)
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    version_ = raw.get("format_version") if isinstance(raw, dict) else None
    if version_ not in READABLE_VERSIONS:
        raise BundleError(
            f"bundle format_version {version_} is not supported (this service reads {', '.join(map(str, READABLE_VERSIONS))}); "
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


def listed_file(bundle_dir: Path, manifest: Manifest, name: str) -> Path:
    """A file the manifest lists, present and inside the bundle folder."""
    if name not in manifest.files:
        raise BundleError(f"{name} is not listed in the manifest's files: refusing to open it")
    path = bundle_file(bundle_dir, name)
    if not path.is_file():
        raise BundleError(f"bundle file {name} is missing from {bundle_dir}")
    return path


def check_digest(manifest: Manifest, name: str, digest: str) -> None:
    if digest != manifest.files[name]:
        raise BundleError(f"bundle file {name} does not match its sha256 in the manifest: refusing to load it")


def read_verified(bundle_dir: Path, manifest: Manifest, name: str) -> bytes:
    """A bundle file's bytes, checked against the manifest's sha256 (the very bytes that will be used)."""
    data = listed_file(bundle_dir, manifest, name).read_bytes()
    check_digest(manifest, name, hashlib.sha256(data).hexdigest())
    return data


def verify_bundle(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Every file's sha256 (streamed, not held in memory) and the needed libraries' versions: a
    one-line error before anything is loaded. (The signature is checked by `read_manifest`.)"""
    for name in manifest.files:
        check_digest(manifest, name, sha256_file(listed_file(Path(bundle_dir), manifest, name)))
    check_libraries(manifest)


def check_libraries(manifest: Manifest) -> None:
    """The installed major.minor of every library the bundle's models need must match the writer's."""
    installed = library_versions(manifest.required_libraries)
    for lib in manifest.required_libraries:
        wrote, have = manifest.library_versions[lib], installed[lib]
        if have == "missing":
            raise BundleError(f"bundle needs {lib} (written with {wrote}), which is not installed")
        if wrote.split(".")[:2] != have.split(".")[:2]:
            raise BundleError(f"bundle was written with {lib} {wrote} but {have} is installed; install {lib}=={wrote}")
