"""Download HAM10000 from Harvard Dataverse (doi:10.7910/DVN/DBW86T), checksums verified.

Writes OUT/HAM10000_metadata.csv and OUT/HAM10000_images_part_{1,2}/ISIC_*.jpg, the layout
`training.data.ham10000` reads. Files already downloaded with the right checksum are not fetched again.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import httpx
from tqdm import tqdm

from training.errors import DownloadError

DATAVERSE_URL = "https://dataverse.harvard.edu"
DOI = "doi:10.7910/DVN/DBW86T"
WANTED = ["HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", "HAM10000_metadata"]
METADATA_SHA256 = "06aee5e603d313ba69de38263053c792a1dff030eb9c44a96ceb477ceefb99a5"


def _digest(path: Path, algo: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).hexdigest()


def list_files(client: httpx.Client, base_url: str) -> list[dict]:
    r = client.get(f"{base_url}/api/datasets/:persistentId/", params={"persistentId": DOI})
    r.raise_for_status()
    return [f["dataFile"] for f in r.json()["data"]["latestVersion"]["files"]]


def fetch(client: httpx.Client, url: str, dest: Path, algo: str, expected: str) -> None:
    if dest.exists() and _digest(dest, algo) == expected:
        return
    part = dest.with_suffix(dest.suffix + ".part")
    with client.stream("GET", url) as r:
        r.raise_for_status()
        total = int(r.headers.get("content-length", 0)) or None
        with open(part, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
            for chunk in r.iter_bytes(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    got = _digest(part, algo)
    if got != expected:
        part.unlink()
        raise DownloadError(f"{dest.name}: {algo} checksum mismatch (got {got}, expected {expected}); try again")
    part.replace(dest)


def download_ham10000(out: Path, base_url: str = DATAVERSE_URL, timeout: float = 60.0) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client:
            files = list_files(client, base_url)
            for name in WANTED:
                match = [f for f in files if f["filename"].startswith(name)]
                if not match:
                    raise DownloadError(f"{DOI} on {base_url} lists no file named {name}*")
                f = match[0]
                algo = f["checksum"]["type"].lower().replace("-", "")
                is_metadata = name == "HAM10000_metadata"
                dest = out / ("HAM10000_metadata.csv" if is_metadata else f["filename"])
                url = f"{base_url}/api/access/datafile/{f['id']}" + ("?format=original" if is_metadata else "")
                fetch(client, url, dest, algo, f["checksum"]["value"])
                if is_metadata and _digest(dest, "sha256") != METADATA_SHA256:
                    print(f"note: {dest.name} differs from the published HAM10000 metadata (sha256 {METADATA_SHA256})")
    except httpx.HTTPError as exc:
        raise DownloadError(
            f"cannot download from {base_url} ({exc.__class__.__name__}: {exc}). Offline? Download "
            f"HAM10000_images_part_1.zip, HAM10000_images_part_2.zip and HAM10000_metadata.csv from "
            f"https://doi.org/10.7910/DVN/DBW86T (or `kaggle datasets download kmader/skin-cancer-mnist-ham10000`) "
            f"and unzip them into {out}"
        ) from None
    for zname in WANTED[:2]:
        folder = out / zname.removesuffix(".zip")
        if not folder.exists():
            try:
                with zipfile.ZipFile(out / zname) as z:
                    z.extractall(folder.with_name(folder.name + ".partial"))
            except zipfile.BadZipFile:
                raise DownloadError(f"{out / zname} is not a valid zip file; delete it and download again") from None
            folder.with_name(folder.name + ".partial").replace(folder)
    print(f"HAM10000 is in {out}; train with: python -m training run --data-dir {out} --out runs/ham10000")
