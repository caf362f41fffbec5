"""Code that downloads (ImageNet weights, HAM10000) against a local HTTP server, and offline."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import socket
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

from training.cnn import models
from training.data.download import DownloadError, download_ham10000


class Server:
    """Serves a dict of path -> bytes on a free loopback port."""

    def __init__(self, routes: dict[str, bytes]):
        routes_ = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = routes_.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_imagenet_weights_download_and_cache(tmp_path, monkeypatch):
    """torchvision's own download path, fed by a local stand-in for download.pytorch.org."""
    buf = io.BytesIO()
    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), buf)
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    name = f"/resnet18-{digest[:8]}.pth"  # torchvision's naming: the sha256 prefix is checked
    server = Server({name: buf.getvalue()})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(models, "IMAGENET_URL", server.url + name)
    try:
        model = models.build_model("resnet18", 7, "imagenet")
    finally:
        server.close()
    assert torch.equal(model.conv1.weight, reference.conv1.weight) and model.fc.out_features == 7
    assert (tmp_path / "torch" / "hub" / "checkpoints" / name.lstrip("/")).exists()
    model2 = models.build_model("resnet18", 7, "imagenet")  # server gone: served from the cache
    assert torch.equal(model2.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    assert torch.equal(models.build_model("resnet18", 7, str(path)).conv1.weight, reference.conv1.weight)


def test_imagenet_weights_offline_names_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = closed_port_url() + "/resnet18-f37072fd.pth"
    monkeypatch.setattr(models, "IMAGENET_URL", url)
    with pytest.raises(models.WeightsError) as err:
        models.build_model("resnet18", 7, "imagenet")
    assert "--weights none" in str(err.value) and "--weights PATH" in str(err.value)
    with pytest.raises(models.WeightsError, match="no such file"):
        models.build_model("resnet18", 7, str(tmp_path / "missing.pth"))


def fake_dataverse(tmp_path: Path, corrupt: bool = False) -> dict[str, bytes]:
    def zipped(names):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for n in names:
                z.writestr(n, b"\xff\xd8fake")
        return buf.getvalue()

    files = {
        "HAM10000_images_part_1.zip": zipped(["ISIC_0000001.jpg"]),
        "HAM10000_images_part_2.zip": zipped(["ISIC_0000002.jpg"]),
        "HAM10000_metadata.tab": b"lesion_id,image_id,dx,dx_type,age,sex,localization\n",
    }
    listing, routes = [], {}
    for i, (name, body) in enumerate(files.items()):
        md5 = hashlib.md5(body).hexdigest()
        listing.append({"dataFile": {"id": i, "filename": name, "checksum": {"type": "MD5", "value": md5}}})
        routes[f"/api/access/datafile/{i}" + ("?format=original" if name.endswith(".tab") else "")] = (
            body + b"x" if corrupt and i == 0 else body
        )
    routes["/api/datasets/:persistentId/?persistentId=doi%3A10.7910%2FDVN%2FDBW86T"] = json.dumps(
        {"data": {"latestVersion": {"files": listing}}}
    ).encode()
    return routes


def test_download_verifies_and_unpacks(tmp_path):
    server = Server(fake_dataverse(tmp_path))
    try:
        download_ham10000(tmp_path / "ham", base_url=server.url)
    finally:
        server.close()
    assert (tmp_path / "ham" / "HAM10000_images_part_1" / "ISIC_0000001.jpg").exists()
    assert (tmp_path / "ham" / "HAM10000_images_part_2" / "ISIC_0000002.jpg").exists()
    assert (tmp_path / "ham" / "HAM10000_metadata.csv").read_text().startswith("lesion_id,")


def test_download_rejects_a_bad_checksum(tmp_path):
    server = Server(fake_dataverse(tmp_path, corrupt=True))
    try:
        with pytest.raises(DownloadError, match="checksum mismatch"):
            download_ham10000(tmp_path / "ham", base_url=server.url)
    finally:
        server.close()
    assert not list((tmp_path / "ham").glob("*.zip"))  # nothing half-downloaded left as if whole


def test_download_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match="Offline"):
        download_ham10000(tmp_path / "ham", base_url=closed_port_url(), timeout=5)
