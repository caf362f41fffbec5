"""Optional Ed25519 signatures over a bundle, with the `cryptography` library.

The signature covers manifest.json byte for byte, and the manifest holds the sha256 of every other
file, so one signature authenticates the whole bundle. `python -m training keygen` makes a key
pair, `python -m training sign` signs a bundle (after training, on the machine that holds the
private key); a service started with `LESION_PUBLIC_KEY` refuses unsigned or altered bundles.
"""

from __future__ import annotations

import base64
from pathlib import Path

from service.core.errors import BundleError
from service.core.files import read_bounded

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"


def verify_signature(bundle_dir: Path, manifest_bytes: bytes, public_key_pem: bytes) -> None:
    """`manifest_bytes` must be the very bytes the caller then parses (read once: no swap in between)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(public_key_pem)
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("the configured public key is not an Ed25519 key")
    sig_path = Path(bundle_dir) / SIGNATURE_NAME
    if not sig_path.exists() and not sig_path.is_symlink():
        raise BundleError(
            f"bundle {bundle_dir} is not signed ({SIGNATURE_NAME} missing) and a public key is configured"
        )
    signature = read_bounded(Path(bundle_dir), SIGNATURE_NAME, 4096)
    try:
        key.verify(base64.b64decode(signature, validate=True), manifest_bytes)
    except (InvalidSignature, ValueError):
        raise BundleError(f"bundle {bundle_dir}: the signature does not match the manifest: refusing it") from None


def sign_bundle(bundle_dir: Path, private_key_pem: bytes) -> Path:
    """Write manifest.sig (base64 Ed25519 signature of manifest.json) atomically; returns its path."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(private_key_pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("the signing key is not an Ed25519 private key (make one with `python -m training keygen`)")
    manifest = Path(bundle_dir) / MANIFEST_NAME
    if not manifest.is_file():
        raise BundleError(f"no {MANIFEST_NAME} in {bundle_dir}: not a model bundle")
    out = Path(bundle_dir) / SIGNATURE_NAME
    tmp = out.with_suffix(".sig.tmp")
    tmp.write_bytes(base64.b64encode(key.sign(manifest.read_bytes())))
    tmp.replace(out)
    return out


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """bundle-signing.key (private, mode 600) and bundle-signing.pub, PEM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = out_dir / "bundle-signing.key", out_dir / "bundle-signing.pub"
    private.touch(mode=0o600)
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public
