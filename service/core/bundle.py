"""Reading a bundle folder: its manifest, its optional signature, the files' sha256 and the
library versions it needs. Only files listed and hashed in the manifest are ever opened, by plain
names inside the folder, and only if each is a regular file (never a symbolic link, a device or a
folder) of a bounded size. The folder itself may be a link (a `current` link to the served bundle).
The manifest's numbers must all be finite (JSON's NaN and Infinity, and 1e999, are refused)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.core.errors import BundleError
from service.core.files import open_regular, read_bounded
from service.core.manifest import MANIFEST_NAME, READABLE_VERSIONS, Manifest
from service.core.signing import verify_signature

__all__ = ["BundleError", "check_libraries", "read_manifest", "read_verified", "verify_bundle"]

MAX_MANIFEST_BYTES = 16 * 1024 * 1024


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a manifest may hold")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def parse_strict_json(data: bytes) -> Any:
    """JSON whose every number is finite: NaN, Infinity and overflowing literals are refused."""
    return json.loads(data, parse_constant=refuse_constant, parse_float=finite_float)


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
    if not path.exists() and not path.is_symlink():
        raise BundleError(
            f"no {MANIFEST_NAME} in {bundle_dir}: not a model bundle (train one with `python -m training run`)"
        )
    data = read_bounded(bundle_dir, MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if public_key_pem is not None:
        verify_signature(bundle_dir, data, public_key_pem)
    try:
        raw = parse_strict_json(data)
    except RecursionError:
        raise BundleError(f"{path} is not a manifest: its JSON is nested too deeply") from None
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


def listed(manifest: Manifest, name: str) -> str:
    """`name`, if the manifest lists (and so hashes) it."""
    if name not in manifest.files:
        raise BundleError(f"{name} is not listed in the manifest's files: refusing to open it")
    return name


def check_digest(manifest: Manifest, name: str, digest: str) -> None:
    if digest != manifest.files[name]:
        raise BundleError(f"bundle file {name} does not match its sha256 in the manifest: refusing to load it")


def read_verified(bundle_dir: Path, manifest: Manifest, name: str) -> bytes:
    """A bundle file's bytes, checked against the manifest's sha256 (the very bytes that will be used)."""
    data = read_bounded(Path(bundle_dir), listed(manifest, name))
    check_digest(manifest, name, hashlib.sha256(data).hexdigest())
    return data


def verify_bundle(bundle_dir: str | Path, manifest: Manifest) -> None:
    """Every file's sha256 (streamed, not held in memory) and the needed libraries' versions: a
    one-line error before anything is loaded. (The signature is checked by `read_manifest`.)"""
    for name in manifest.files:
        with open_regular(Path(bundle_dir), listed(manifest, name)) as f:
            check_digest(manifest, name, hashlib.file_digest(f, "sha256").hexdigest())
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
