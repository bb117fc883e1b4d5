"""The ONNX Runtime C/C++ headers the custom-op library (tnonnx.custom_ops) is compiled
against, which the PyPI wheel does not ship: found in a given folder or $ORT_INCLUDE_DIR, or
Debian's ``libonnxruntime-dev`` package (a pinned version, checked by sha256) downloaded
with ``apt-get`` run on a private sources list and state folder (no root, the system's apt
configuration is not touched), else straight from the mirror, and unpacked."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from .errors import TnonnxError

ENV_INCLUDE = "ORT_INCLUDE_DIR"  # a folder with onnxruntime_cxx_api.h
_HEADER = "onnxruntime_cxx_api.h"

# The headers: Debian trixie's libonnxruntime-dev. They are the same for every
# architecture, so the amd64 package is fetched everywhere and one hash pins it.
ORT_DEV_PACKAGE = "libonnxruntime-dev"
ORT_DEV_VERSION = "1.21.0+dfsg-1"
ORT_DEV_ARCH = "amd64"
ORT_DEV_SHA256 = "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "trixie"
_DEB_NAME = f"{ORT_DEV_PACKAGE}_{ORT_DEV_VERSION}_{ORT_DEV_ARCH}.deb"
_POOL_URL = f"{DEBIAN_MIRROR}/pool/main/o/onnxruntime/{_DEB_NAME}"


class HeadersUnavailable(TnonnxError):
    """The ONNX Runtime headers are neither given nor usable from the download."""


class HeadersUnreachable(HeadersUnavailable):
    """The download of the headers failed (no network, mirror unreachable)."""


def fetch_headers(build_dir, log=None) -> Path:
    """Download Debian's libonnxruntime-dev (pinned version, sha256 checked) into
    `build_dir`/ort-headers and unpack its headers there; returns the include folder."""
    log = log or (lambda message: None)
    root = Path(build_dir) / "ort-headers"
    root.mkdir(parents=True, exist_ok=True)
    deb = root / _DEB_NAME
    if not (deb.is_file() and _file_sha256(deb) == ORT_DEV_SHA256):
        log(f"fetching the onnxruntime headers ({ORT_DEV_PACKAGE} {ORT_DEV_VERSION} from Debian {DEBIAN_SUITE})")
        problems, corrupt = [], False
        for method in (_apt_download, _direct_download):
            try:
                method(root, deb)
            except _FetchFailed as exc:
                problems.append(str(exc))
                continue
            digest = _file_sha256(deb)
            if digest == ORT_DEV_SHA256:
                break
            problems.append(f"{deb.name} has sha256 {digest}, expected {ORT_DEV_SHA256}")
            corrupt = True
            deb.unlink()
        else:
            error = HeadersUnavailable if corrupt else HeadersUnreachable
            raise error(f"cannot fetch the onnxruntime headers ({'; '.join(problems)}); set {ENV_INCLUDE} "
                        f"to a folder with {_HEADER} or pass --include-dir")
    # unpack beside, then move into place: a concurrent build never sees half a tree
    tree, tmp = root / "tree", Path(tempfile.mkdtemp(prefix=".tree.", dir=root))
    try:
        os.chmod(tmp, 0o755 & ~_umask())
        _extract(deb, tmp)
        if _header_dir(tmp / "usr" / "include") is None:
            raise HeadersUnavailable(f"{deb.name} holds no {_HEADER}")
        shutil.rmtree(tree, ignore_errors=True)
        try:
            os.rename(tmp, tree)
        except OSError:  # another build put its tree there first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_atomic(root / "verified", (ORT_DEV_SHA256 + "\n").encode())
    return _header_dir(tree / "usr" / "include")


class _FetchFailed(Exception):
    pass


def _apt_download(root: Path, deb: Path) -> None:
    """apt-get update + download on a private sources list, lists and cache under `root`."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise _FetchFailed("apt-get not found")
    state = root / "apt"
    for d in ("lists/partial", "cache/archives/partial", "etc"):
        (state / d).mkdir(parents=True, exist_ok=True)
    sources = state / "etc" / "sources.list"
    # trusted=yes: no Debian keyring is needed on the host; the pinned sha256 checks the file
    sources.write_text(f"deb [trusted=yes arch={ORT_DEV_ARCH}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
    options = [
        f"Dir::Etc::SourceList={sources}", "Dir::Etc::SourceParts=/dev/null",
        "Dir::Etc::Preferences=/dev/null", "Dir::Etc::PreferencesParts=/dev/null",
        f"Dir::State::Lists={state / 'lists'}", f"Dir::Cache={state / 'cache'}", "Dir::State::status=/dev/null",
        "Debug::NoLocking=1", f"APT::Sandbox::User={_user()}", "Acquire::Languages=none",
        f"APT::Architecture={ORT_DEV_ARCH}", f"APT::Architectures={ORT_DEV_ARCH}",
        "Acquire::http::Timeout=30", "Acquire::Retries=2", "APT::Update::Error-Mode=any",
    ]
    args = [a for o in options for a in ("-o", o)]
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    for cmd in (["update"], ["download", f"{ORT_DEV_PACKAGE}={ORT_DEV_VERSION}"]):
        try:
            done = subprocess.run([apt, "-q", *args, *cmd], cwd=root, capture_output=True, text=True, env=env,
                                  timeout=600)
        except subprocess.TimeoutExpired:
            raise _FetchFailed(f"apt-get {cmd[0]} timed out") from None
        output = (done.stderr + done.stdout).splitlines()
        failed = [l for l in output if l.startswith(("E:", "Err")) or l.startswith("W: Failed to fetch")]
        if done.returncode != 0 or failed:
            detail = (failed or [l for l in output if l.startswith("W:")] or [f"exit status {done.returncode}"])[0]
            raise _FetchFailed(f"apt-get {cmd[0]}: {detail.strip()}")
    if not deb.is_file():
        raise _FetchFailed(f"apt-get download left no {deb.name}")


def _direct_download(root: Path, deb: Path) -> None:
    """The same file straight from the mirror's pool (for hosts without apt-get)."""
    tmp = deb.with_suffix(".part")
    try:
        with urllib.request.urlopen(_POOL_URL, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(tmp, deb)
    except OSError as exc:
        raise _FetchFailed(f"{_POOL_URL}: {getattr(exc, 'reason', None) or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _extract(deb: Path, dest: Path) -> None:
    """dpkg-deb -x, or (without dpkg) the data member of the ar archive read in Python."""
    dest.mkdir(parents=True, exist_ok=True)
    dpkg = shutil.which("dpkg-deb")
    if dpkg is not None:
        done = subprocess.run([dpkg, "-x", str(deb), str(dest)], capture_output=True, text=True)
        if done.returncode == 0:
            return
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise HeadersUnavailable(f"{deb.name} is not a Debian package")
    at = 8
    while at + 60 <= len(data):
        name, size = data[at:at + 16].decode().strip().rstrip("/"), int(data[at + 48:at + 58].decode().strip())
        body = data[at + 60:at + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                members = [m for m in tar.getmembers() if m.name.lstrip("./").startswith("usr/include/")]
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(dest, members=members, **kwargs)
            return
        at += 60 + size + (size % 2)
    raise HeadersUnavailable(f"{deb.name}: no data member")


_HEADER_SUBDIRS = ("", "include", "onnxruntime", "include/onnxruntime", "usr/include/onnxruntime",
                   "include/onnxruntime/core/session")  # as given, release archives, Debian, source trees


def _header_dir(path: Path) -> Path | None:
    for candidate in (path / sub if sub else path for sub in _HEADER_SUBDIRS):
        if (candidate / _HEADER).is_file() and (candidate / "onnxruntime_c_api.h").is_file():
            return candidate
    return None


def _local_headers(build_dir: Path) -> Path | None:
    """Headers available without downloading: $ORT_INCLUDE_DIR or fetched earlier."""
    env = os.environ.get(ENV_INCLUDE)
    if env:
        return _header_dir(Path(env))
    root = Path(build_dir) / "ort-headers"
    if (root / "verified").is_file():
        return _header_dir(root / "tree" / "usr" / "include")
    return None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return os.environ.get("USER", "root")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644 & ~_umask())
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
