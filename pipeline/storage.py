"""Inputs and outputs on any fsspec filesystem: local paths, file://, s3:// and the rest.

Keys are paths relative to SRC, '/'-separated, exactly as the store holds them (spaces, unicode,
even '..' segments: S3 allows a key like "a/../../b.png"). `join` is the only way outputs are placed
under DST, and it makes every key safe first, so no key can write outside DST.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import uuid
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec

from pipeline.images import FORMATS

# Folder DST keeps its own records in (manifests, run parts); never an input, wherever it lies.
STATE_DIR = "_isosr"
_ESCAPED_PARENT = "%2E%2E"  # what a '..' segment becomes: the data is kept, under a visible name


@dataclass(frozen=True)
class InputFile:
    uri: str  # full URI of the input, e.g. "s3://bucket/photos/a b/ü.png" or "/data/in/x.jpg"
    key: str  # path relative to SRC, '/'-separated, exactly as stored (may contain spaces, unicode, '..';
    # the bytes of a local name that are not UTF-8 are written \xNN, see printable)
    size: int  # bytes
    version: str  # S3: the ETag (quotes stripped); local/other: mtime as ISO 8601 UTC with microseconds
    error: str | None = None  # why it cannot be processed, known from the listing alone (NOT_UTF8)


NOT_UTF8 = "its name is not valid UTF-8 (shown here with \\xNN for the bytes that are not); rename it to upscale it"

NAME_MAX = 255  # bytes in one path segment, on Linux's and macOS's filesystems

# Attempts per S3 request, the first included: at 10 % of requests failing, 10 attempts all fail
# once in 10^10 requests, and the backoff between them (up to 20 s) rides out a short outage.
S3_MAX_ATTEMPTS = 10


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and its path for a local path or any fsspec URI (trailing '/' removed,
    local paths made absolute). s3:// is configured by the standard AWS environment variables alone;
    botocore itself reads AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_S3), so no endpoint is passed here.
    s3fs caches filesystems by constructor arguments, not by environment: a process that changes
    those variables must call s3fs.S3FileSystem.clear_instance_cache().

    S3 requests that fail with 500/502/503/504, throttling (SlowDown) or a dropped connection are
    retried with exponential backoff and jitter (botocore's "standard" mode), up to S3_MAX_ATTEMPTS
    attempts; AWS_RETRY_MODE and AWS_MAX_ATTEMPTS, when set, are botocore's and take precedence."""
    uri = os.fspath(uri)
    if uri.startswith(("s3://", "s3a://")) and not {"AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"} & set(os.environ):
        retries = {"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS}
        return fsspec.core.url_to_fs(uri, config_kwargs={"retries": retries})
    return fsspec.core.url_to_fs(uri)


def absolute(uri: str) -> str:
    """A local path made absolute against this process's working folder (as `filesystem` makes it);
    any other URI as it is. For URIs handed to processes that may run elsewhere (Ray Train runs its
    workers in a folder of its own)."""
    fs, path = filesystem(uri)
    return os.path.normpath(path) if _is_local(fs) else uri  # fsspec leaves ".." segments in


def list_inputs(
    src: str,
    *,
    exclude: Sequence[str] = (),
    suffixes: Collection[str] = tuple(FORMATS),
    ignored: Counter[str] | None = None,
) -> list[InputFile]:
    """Every input file under SRC, recursively, sorted by key: one whose suffix is in `suffixes`
    (default: the image suffixes of pipeline.images.FORMATS), any case. Skips anything under a folder named `_isosr`, and anything
    under a URI in `exclude` that lies inside SRC (DST, so earlier outputs are not inputs; a DST that
    holds SRC excludes nothing, one equal to SRC excludes everything). If SRC is itself a file it is
    the one input whatever its suffix (the user named it), with its name as key and SRC as URI.
    Otherwise `join(src, f.key) == f.uri` for every key without '.', '..' or empty segments, and
    URIs keep SRC's spelling (a relative SRC gives relative URIs).
    Locally, a symbolic link to a file is that file; a folder that cannot be listed, a FIFO, a device,
    a link to nothing and a name that is not UTF-8 are inputs whose `error` says so (nothing reads them).
    `ignored`, when given, counts the files left out for their suffix, by suffix (lower case; "" for
    none), so that the caller can say what was not upscaled (a camera's RAW files, sidecars).
    One recursive listing, no request per object. Raises FileNotFoundError naming SRC when it does
    not exist (a missing bucket, or a prefix with no objects under it), PermissionError when it
    cannot be listed."""
    fs, root = filesystem(src)
    local = _is_local(fs)
    try:
        # Locally with the folders too: fsspec's walk leaves out a folder it cannot list, without a word.
        found: dict[str, dict[str, Any]] = fs.find(root, detail=True, withdirs=local)
    except FileNotFoundError as e:  # s3fs: "The specified bucket does not exist"
        raise FileNotFoundError(errno.ENOENT, f"input {src} does not exist ({e}); check the bucket and path") from None
    except PermissionError as e:
        raise PermissionError(errno.EACCES, f"input {src} cannot be listed ({e}); check the credentials") from None

    if list(found) == [root]:
        info = _complete(fs, root, found[root])
        info, error = _follow(fs, root, info) if info.get("type") == "other" else (info, None)
        if info.get("type", "file") != "directory":
            name, size, version = posixpath.basename(root), int(info["size"]), _version(fs, root, info)
            return [InputFile(_under(src, ""), name, size, version, error)]

    if not found and not fs.isdir(root):
        if local:
            raise FileNotFoundError(errno.ENOENT, f"input {src} does not exist")
        raise FileNotFoundError(
            errno.ENOENT,
            f"input {src} does not exist: there are no objects under this prefix "
            "(object stores have no empty folders); check the bucket and path",
        )

    skipped = _excluded_prefixes(fs, root, exclude)
    prefix = root if root.endswith("/") else root + "/"
    if local and not os.access(root, os.R_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"input {src} cannot be listed (permission denied); check its permissions")
    inputs = []
    for path, info in found.items():
        if path == root.rstrip("/"):  # listed with the folders
            continue
        if not path.startswith(prefix):  # not expected from fsspec; a wrong key would misplace outputs
            raise RuntimeError(f"listing {src} returned {path!r}, which is not under it")
        key = path[len(prefix) :]
        name = key.rpartition("/")[2]
        if STATE_DIR in f"{key}/".split("/") or any(_inside(key, p) for p in skipped):
            continue
        if info.get("type") == "directory":
            if local and not os.access(path, os.R_OK | os.X_OK):
                inputs.append(_unlisted(src, key))
            continue
        if (suffix := posixpath.splitext(name)[1].lower()) not in suffixes:
            if ignored is not None:
                ignored[suffix] += 1
            continue
        info, error = _follow(fs, path, info) if info.get("type") == "other" else (info, None)
        if info.get("type", "file") == "directory":
            continue
        info = _complete(fs, path, info)
        shown = printable(key)
        error = NOT_UTF8 if shown != key else error
        inputs.append(InputFile(_under(src, shown), shown, int(info["size"]), _version(fs, path, info), error))
    inputs.sort(key=lambda f: f.key)
    return inputs


def printable(name: str) -> str:
    """`name` with the bytes of a local file name that are not UTF-8 written as \\xNN. Python keeps
    such bytes as lone surrogates (PEP 383), which Arrow, JSON and S3 keys refuse; a name that is
    valid UTF-8 comes back unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def safe_key(key: str) -> str:
    """A relative key that, joined under any root, can never leave it: leading '/' removed, empty and
    '.' segments dropped, '..' segments replaced by '%2E%2E', backslashes kept as ordinary characters.
    Raises ValueError for a key with nothing left after this (e.g. "", "/", "./.")."""
    segments = [_ESCAPED_PARENT if s == ".." else s for s in key.split("/") if s not in ("", ".")]
    if not segments:
        raise ValueError(f"key {key!r} names no file: it is empty once '/', '.' and empty parts are removed")
    return "/".join(segments)


def join(root: str, key: str) -> str:
    """`root` + '/' + safe_key(key), for local paths and URIs alike, with no double slash
    ("s3://b/out/" + "a/x.png" -> "s3://b/out/a/x.png"). Raises ValueError for an empty root or a key
    that safe_key refuses."""
    if not root:
        raise ValueError(f"cannot place key {key!r} under an empty root; give DST as a path or URI")
    return _under(root, safe_key(key))


def run_dir(dst: str, run_id: str) -> str:
    """Where a run's manifest, report, parts and staging go: DST/_isosr/runs/<run_id>."""
    return join(dst, f"{STATE_DIR}/runs/{run_id}")


def key_digest(key: str) -> str:
    """A short name for `key` that is safe in any path (the run's staging and the shard records):
    the first 24 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def write_atomic(uri: str, data: bytes) -> None:
    """Write `data` so that readers never see half an object. Local files: parents created, written to
    a hidden temporary name in the same folder, renamed into place (the temporary is removed if
    anything fails). Object stores: one upload (s3fs makes large ones multipart); an S3 object appears
    only once complete. Raises OSError naming `uri`."""
    fs, path = filesystem(uri)
    if _is_local(fs):
        with open_atomic(uri) as f:
            f.write(data)
        return
    try:
        fs.pipe_file(path, data)
    except OSError as e:  # s3fs's messages ("The specified bucket does not exist") name no object
        raise type(e)(f"cannot write {uri}: {e}") from e


@contextmanager
def open_atomic(uri: str) -> Iterator[Any]:
    """A binary file to stream a large output into, which readers see whole or not at all: what
    write_atomic does for bytes in memory. Local files: a hidden temporary in the same folder,
    renamed into place on success and removed on failure. Object stores: s3fs's multipart upload,
    which completes on success (the object appears only then) and is aborted if anything fails.
    Raises OSError naming `uri`."""
    fs, path = filesystem(uri)
    if not _is_local(fs):
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            f.discard()  # aborts a multipart upload; a small file is only uploaded by close()
            f.closed = True  # so that close(), and the file's __del__, upload nothing
            raise
        try:
            f.close()
        except OSError as e:
            raise type(e)(f"cannot write {uri}: {e}") from e
        return
    folder, name = os.path.split(path)
    # Unique per call, not just per process: Ray runs several tasks in one worker process. The name is
    # cut short where the temporary's would exceed NAME_MAX: any name the output may have, it may.
    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    while len(os.fsencode(f".{name}{suffix}")) > NAME_MAX:
        name = name[:-1]
    tmp = os.path.join(folder, f".{name}{suffix}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)  # atomic on POSIX: the old file or the new one, never a mix
    except OSError as e:
        _remove_quietly(tmp)
        if e.errno is None:
            raise
        # The error would name the hidden temporary; the user needs the output's name.
        raise OSError(e.errno, f"cannot write {uri}: {e.strerror or e}; check that its folder is writable") from e
    except BaseException:
        _remove_quietly(tmp)
        raise


def read_bytes(uri: str) -> bytes:
    """The whole file or object. Raises FileNotFoundError naming `uri` when there is none."""
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such file or object", uri) from None


def exists(uri: str) -> bool:
    """Whether a file (an object, on object stores) is at `uri` now; False for folders and prefixes."""
    fs, path = filesystem(uri)
    # s3fs answers from listings it cached earlier in this process (list_inputs fills that cache),
    # which would miss an output written since, or see one deleted since.
    fs.invalidate_cache(path)
    return fs.isfile(path)


def same_place(a: str, b: str) -> bool:
    """Whether two URIs name the same folder or prefix (local paths compared after resolving
    symlinks and '..', so `d`, `d/../d` and `file://d` are one place)."""
    fs_a, path_a = filesystem(a)
    fs_b, path_b = filesystem(b)
    if _is_local(fs_a) and _is_local(fs_b):
        return os.path.realpath(path_a) == os.path.realpath(path_b)
    return type(fs_a) is type(fs_b) and path_a.rstrip("/") == path_b.rstrip("/")


def list_files(root: str) -> set[str]:
    """Filesystem paths (as `filesystem(uri)[1]` gives them) of every file under `root`, in one
    listing; empty when `root` does not exist yet."""
    fs, path = filesystem(root)
    try:
        return set(fs.find(path))
    except FileNotFoundError:
        return set()


def with_suffix(key: str, suffix: str) -> str:
    """`key` with the suffix of its last segment replaced, or added when it has none:
    'a/b.c.png' + '.jpg' -> 'a/b.c.jpg'; 'a/noext' -> 'a/noext.jpg'; '.hidden' -> '.hidden.jpg'.
    Raises ValueError for a suffix that is not '.' + a name, or a key ending in '/'."""
    if not suffix.startswith(".") or len(suffix) < 2 or "/" in suffix:
        raise ValueError(f"suffix {suffix!r} must be '.' followed by a name, e.g. '.png'")
    folder, sep, name = key.rpartition("/")
    if not name:
        raise ValueError(f"key {key!r} ends in '/': it names a folder, not a file")
    return folder + sep + posixpath.splitext(name)[0] + suffix


# ----------------------------------------------------------------------------- internals


def _under(root: str, key: str) -> str:
    """`root` + '/' + `key` with no double slash; a filesystem root ("/", "file:///") keeps its slashes."""
    base = root.rstrip("/")
    if not base or base.endswith(":"):
        return root + key
    return base + "/" + key if key else base


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def _complete(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any]) -> dict[str, Any]:
    """`info` from the listing, or from one info() call where the listing left out size or time."""
    if "size" in info and ("ETag" in info or "mtime" in info or "LastModified" in info):
        return info
    return {**info, **fs.info(path)}


def _unlisted(src: str, key: str) -> InputFile:
    """The input that stands for a local folder that cannot be listed (a permission denied): its key
    is the folder's with a '/' at the end, so that a run says which files it leaves out, and why."""
    key = printable(key) + "/"
    why = "this folder cannot be listed (permission denied), so the files in it are not in the run; fix its permissions"
    return InputFile(_under(src, key), key, 0, "", why)


def _follow(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(info, why it cannot be read) for a listing entry that is neither a file nor a folder, as local
    listings give them: a symbolic link is followed to its file (whose size and time count) or folder
    (not descended into, as the listing does not, so links cannot loop); a FIFO, socket or device, or
    a link to one or to nothing, is an input that cannot be read, and nothing is read from it."""
    try:
        target = fs.info(path)  # follows symbolic links
    except FileNotFoundError:
        return info, f"a symbolic link to {info.get('destination')}, which does not exist"
    except OSError as e:  # e.g. a link to itself
        return info, f"a symbolic link to {info.get('destination')}, which cannot be followed ({e.strerror})"
    if target["type"] in ("file", "directory"):
        return target, None
    return info, "not a regular file (a FIFO, socket or device, or a link to one): nothing was read from it"


def _version(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any]) -> str:
    """The S3 ETag without its quotes, else the modification time (ISO 8601, UTC, microseconds)."""
    etag = info.get("ETag")
    if etag:
        return str(etag).strip('"')
    mtime = info.get("mtime", info.get("LastModified"))
    if mtime is None:
        mtime = fs.modified(path)
    if isinstance(mtime, datetime):
        when = mtime if mtime.tzinfo else mtime.replace(tzinfo=UTC)  # fsspec: naive means UTC
    else:
        when = datetime.fromtimestamp(float(mtime), tz=UTC)
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _excluded_prefixes(fs: fsspec.AbstractFileSystem, root: str, exclude: Sequence[str]) -> list[str]:
    """Keys (relative to `root`) of the URIs in `exclude` that lie inside `root`; "" excludes it all.
    Local paths are compared resolved (symlinks, '..', relative spellings); object keys literally,
    since "a/../b" and "b" are different S3 keys."""
    prefixes = []
    for uri in exclude:
        other_fs, other = filesystem(uri)
        if other_fs.protocol != fs.protocol:
            continue
        base, inner = root, other
        if _is_local(fs):
            base, inner = os.path.realpath(root), os.path.realpath(other)
        if inner == base:
            prefixes.append("")
        elif inner.startswith(base.rstrip("/") + "/"):
            prefixes.append(inner[len(base.rstrip("/")) + 1 :])
    return prefixes


def _inside(key: str, prefix: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + "/")


def remove(uri: str) -> None:
    """Delete a file or a folder (recursively) if it exists; nothing happens if it does not."""
    fs, path = filesystem(uri)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _remove_quietly(path: str) -> None:
    """Remove a temporary, if there is one; never raises, so that the error that made it unwanted is
    the one reported (an unlink of a name too long failed with its own error, hiding the first)."""
    try:
        os.unlink(path)
    except OSError:
        pass
