"""Builds the reference stack's images with no image registry.

Each image is built from a context assembled from exactly the files it needs, and tagged with a
hash of those files, so a rebuild with nothing changed is a lookup, not a build. Python
packages come from a wheelhouse built on the host (HTTPS from inside containers fails here).
Run by bin/bootstrap; `python stack/build.py --list` prints the images.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker

STACK = Path(__file__).resolve().parent
BUILD = STACK / ".build"
WHEELHOUSE = BUILD / "wheelhouse"
REQUIREMENTS = STACK / "services" / "requirements.txt"
TAG = "dev"
BASE_IMAGE = "debian:bookworm-slim"
SERVICES = ("ingest", "aggregator", "diagnoser", "probe")


@dataclass(frozen=True)
class Image:
    """An image: its name, its Dockerfile folder and the files to put into its context."""

    name: str
    dockerfile_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # path in context -> source file or dir
    buildargs: dict[str, str] = field(default_factory=dict)


def _walk(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _context_members(image: Image) -> list[tuple[str, Path]]:
    members = [(p.name, p) for p in _walk(image.dockerfile_dir)]
    for arcname, source in image.files.items():
        if source.is_file():
            members.append((arcname, source))
        else:
            members += [(f"{arcname}/{p.relative_to(source)}", p) for p in _walk(source)]
    return sorted(members)


def content_hash(image: Image) -> str:
    """A hash of everything the image is made of, the base image included."""
    digest = hashlib.sha256(_base_image_id().encode())
    for arcname, source in _context_members(image):
        digest.update(arcname.encode())
        digest.update(hashlib.sha256(source.read_bytes()).digest())
    for key, value in sorted(image.buildargs.items()):
        digest.update(f"{key}={value}".encode())
    return digest.hexdigest()[:16]


@functools.cache
def _base_image_id() -> str:
    return str(docker.from_env().images.get(BASE_IMAGE).id)


def _context_tar(image: Image) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for arcname, source in _context_members(image):
            tar.add(source, arcname=arcname)
    buffer.seek(0)
    return buffer


def build_wheelhouse() -> None:
    """Wheels for the services' requirements, rebuilt only when requirements.txt changes."""
    stamp = WHEELHOUSE / "requirements.txt"
    if stamp.exists() and stamp.read_bytes() == REQUIREMENTS.read_bytes():
        return
    log("building the Python wheelhouse for the service images")
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    for old in WHEELHOUSE.glob("*.whl"):
        old.unlink()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "-r",
            str(REQUIREMENTS),
            "-w",
            str(WHEELHOUSE),
        ],
        check=True,
    )
    stamp.write_bytes(REQUIREMENTS.read_bytes())


def images() -> list[Image]:
    """The stack's images in build order (the service images build on qoe/python)."""
    python = Image("qoe/python", STACK / "images" / "python", {"wheelhouse": WHEELHOUSE})
    base_tag = f"{python.name}:{content_hash(python)}"
    binaries = BUILD / "bin"
    return [
        python,
        *(
            Image(
                f"qoe/{service}",
                STACK / "images" / "service",
                {"qoe": STACK / "services" / "qoe", "sql": STACK / "sql"},
                {"BASE": base_tag, "SERVICE": service},
            )
            for service in SERVICES
        ),
        Image("qoe/nats", STACK / "images" / "nats", {"nats-server": binaries / "nats-server"}),
        Image(
            "qoe/toxiproxy",
            STACK / "images" / "toxiproxy",
            {"toxiproxy-server": binaries / "toxiproxy-server"},
        ),
        Image("qoe/postgres", STACK / "images" / "postgres"),
    ]


def log(message: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(client: docker.DockerClient, image: Image, tag: str = TAG) -> None:
    """Build `image` (unless its content hash is there) and tag it `tag` (the mutation run
    tags its mutants with their own, leaving `dev`, which the stack runs, alone)."""
    hashed = f"{image.name}:{content_hash(image)}"
    try:
        client.images.get(hashed)
    except docker.errors.ImageNotFound:
        started = time.monotonic()
        log(f"building {hashed}")
        client.images.build(
            fileobj=_context_tar(image),
            custom_context=True,
            tag=hashed,
            buildargs=image.buildargs,
            rm=True,
            forcerm=True,
        )
        log(f"built {hashed} in {time.monotonic() - started:.0f} s")
    client.images.get(hashed).tag(image.name, tag)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the images and their tags")
    args = parser.parse_args()
    if args.list:
        for image in images():
            print(f"{image.name}:{TAG}")
        return 0
    build_wheelhouse()
    client = docker.from_env()
    for image in images():
        try:
            build(client, image)
        except docker.errors.BuildError as error:
            tail = "".join(str(chunk.get("stream", "")) for chunk in error.build_log)[-4000:]
            print(f"build of {image.name} failed: {error}\n{tail}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
