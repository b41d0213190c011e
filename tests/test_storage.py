"""Tests for pipeline.storage: listing inputs, placing outputs, writing them whole, on local folders
and on a real (moto) S3 endpoint reached through the standard AWS environment only.

What a user would notice: an image that is not processed (odd name, uppercase suffix), a file that is
processed but should not be (DST inside SRC, the _isosr/ records, a text file), a size or version
that does not match the store, an output written outside DST (a key with '..'), a half-written or
leftover temporary file, an error that does not say which SRC is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.run import RunOptions, plan_inputs
from pipeline.storage import (
    NOT_UTF8,
    InputFile,
    exists,
    filesystem,
    join,
    list_inputs,
    read_bytes,
    safe_key,
    with_suffix,
    write_atomic,
)

ROOT = Path(__file__).resolve().parent.parent

# A tree as a user's dataset might look: key -> bytes (distinct sizes, so a size mix-up shows).
IMAGES = {
    "fotos/ñandú 1.JPG": b"j" * 11,
    "a b/c d.png": b"p" * 12,
    "deep/er/still/x.TIFF": b"t" * 13,
    "top.webp": b"w" * 14,
    "fotos/中文 名.jpeg": b"c" * 15,
    "output.png": b"o" * 16,  # shares a prefix with DST "out" but is not inside it
}
NOT_INPUTS = {
    "notes.txt": b"n",
    "fotos/readme": b"r",
    "fotos/photo.png.bak": b"b",
    "_isosr/runs/r1/preview.png": b"i",  # DST's own records
    "fotos/_isosr/x.png": b"i",  # ... wherever they lie
    "out/y.png": b"d",  # DST inside SRC: outputs of an earlier run
    "out/sub/z.JPG": b"d",
}


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------- S3 fixture


def put_tree(client, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=prefix + key, Body=data)


def etag(client, bucket: str, key: str) -> str:
    return client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


# ----------------------------------------------------------------------------- listing: local


def test_local_listing_finds_every_image_and_nothing_else(tmp_path: Path) -> None:
    src = tmp_path / "in"
    make_tree(src, {**IMAGES, **NOT_INPUTS})
    # DST spelled differently from SRC (through '..'): it must still be recognised as inside SRC.
    dst = str(src / "fotos" / ".." / "out")

    ignored: Counter[str] = Counter()
    listed = list_inputs(str(src), exclude=[dst], ignored=ignored)

    assert [f.key for f in listed] == sorted(IMAGES)
    assert ignored == {".txt": 1, "": 1, ".bak": 1}  # what a run says it left alone; not DST, not _isosr
    for f in listed:
        assert f.size == len(IMAGES[f.key])
        assert f.uri == str(src / f.key)
        assert join(str(src), f.key) == f.uri
        assert read_bytes(f.uri) == IMAGES[f.key]
    # The same inputs whichever way SRC is spelled.
    assert list_inputs(str(src) + "/", exclude=[dst]) == listed
    as_uri = list_inputs(f"file://{src}/", exclude=[f"file://{src}/out/"])
    assert [(f.key, f.size, f.version) for f in as_uri] == [(f.key, f.size, f.version) for f in listed]
    assert all(f.uri == f"file://{src}/{f.key}" and read_bytes(f.uri) == IMAGES[f.key] for f in as_uri)


def test_local_listing_without_exclude_keeps_a_folder_named_like_dst(tmp_path: Path) -> None:
    make_tree(tmp_path, {**IMAGES, **NOT_INPUTS})
    keys = [f.key for f in list_inputs(str(tmp_path))]
    assert "out/y.png" in keys and "out/sub/z.JPG" in keys  # only an explicit exclude removes them
    assert not any("_isosr" in k for k in keys)
    assert list_inputs(str(tmp_path), exclude=[str(tmp_path)]) == []  # DST == SRC excludes all
    # DST holding SRC (SRC = DST/fotos): outputs land beside SRC, not in it, so nothing is excluded.
    assert len(list_inputs(str(tmp_path / "fotos"), exclude=[str(tmp_path)])) == 2


def test_local_version_is_the_mtime_and_changes_when_the_file_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_bytes(b"first")
    written_at_ns = 981_173_106_123_456_000  # 2001-02-03T04:05:06.123456Z
    os.utime(path, ns=(written_at_ns, written_at_ns))

    (before,) = list_inputs(str(tmp_path))
    assert before.version == "2001-02-03T04:05:06.123456+00:00"

    path.write_bytes(b"second, longer")
    (after,) = list_inputs(str(tmp_path))
    assert after.version != before.version
    assert after.version == iso_utc(path.stat().st_mtime)
    assert after.size == len(b"second, longer")


def test_local_single_file_src_is_the_one_input(tmp_path: Path) -> None:
    path = tmp_path / "só uma.PNG"
    path.write_bytes(b"12345")
    (f,) = list_inputs(str(path))
    assert f == InputFile(str(path), "só uma.PNG", 5, iso_utc(path.stat().st_mtime))


def test_a_local_name_that_is_not_utf8_is_listed_printable_with_the_reason_it_cannot_be_processed(
    tmp_path: Path,
) -> None:
    """Local file names are bytes; one in Latin-1 (b'\\xe9t\\xe9.png', 'été' there) has no str that
    Arrow, JSON or an S3 key accepts. It is listed under a printable key, with the reason."""
    os.close(os.open(os.fsencode(tmp_path) + b"/\xe9t\xe9.png", os.O_CREAT | os.O_WRONLY))
    (tmp_path / "été.png").write_bytes(b"12")  # the same name in UTF-8 is an ordinary input
    bad, good = list_inputs(str(tmp_path))
    assert (bad.key, bad.uri, bad.error) == ("\\xe9t\\xe9.png", f"{tmp_path}/\\xe9t\\xe9.png", NOT_UTF8)
    assert bad.key.encode("utf-8") and bad.size == 0
    assert (good.key, good.size, good.error) == ("été.png", 2, None)


def test_local_links_are_followed_to_files_and_other_kinds_are_inputs_that_cannot_be_read(tmp_path: Path) -> None:
    """A symbolic link to a file is that file, under the link's name; a link to a folder is not
    followed (links could loop); a FIFO, a link to a device and a link to nothing are inputs with the
    reason they cannot be read, found without opening them (opening a FIFO waits for a writer)."""
    (tmp_path / "real.png").write_bytes(b"12345")
    (tmp_path / "link.png").symlink_to("real.png")
    (tmp_path / "loop").symlink_to(".")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "gone.png").symlink_to("nowhere.png")
    (tmp_path / "self.png").symlink_to("self.png")
    os.mkfifo(tmp_path / "fifo.png")
    listed = {f.key: f for f in list_inputs(str(tmp_path))}
    assert sorted(listed) == ["fifo.png", "gone.png", "link.png", "real.png", "self.png", "zero.png"]
    assert (listed["link.png"].size, listed["link.png"].error) == (5, None)
    assert listed["link.png"].version == listed["real.png"].version  # the file's, not the link's
    assert listed["gone.png"].error == "a symbolic link to nowhere.png, which does not exist"
    assert (
        listed["self.png"].error
        == "a symbolic link to self.png, which cannot be followed (Too many levels of symbolic links)"
    )
    assert all(listed[k].error.startswith("not a regular file") for k in ("fifo.png", "zero.png"))
    (one,) = list_inputs(str(tmp_path / "fifo.png"))  # SRC itself: it was a RuntimeError
    assert (one.key, one.error) == ("fifo.png", listed["fifo.png"].error)


UNPRIVILEGED = [
    "setpriv",
    "--bounding-set",
    "-dac_override,-dac_read_search",
    "--inh-caps",
    "-dac_override,-dac_read_search",
]


def test_a_local_folder_that_cannot_be_listed_is_an_input_saying_so(tmp_path: Path) -> None:
    """fsspec's walk leaves out a folder it cannot list (permission denied) without a word, so its
    files were silently not in the run. The folder is now an input of its own, with the reason; a
    SRC that cannot be listed at all is refused. Root reads any folder: as root the listing runs in
    a process without the capabilities that let it (util-linux's setpriv)."""
    src = tmp_path / "src"
    (src / "locked").mkdir(parents=True)
    (src / "locked" / "inner.png").write_bytes(b"1")
    (src / "ok.png").write_bytes(b"22")
    script = (
        "import sys\nfrom pipeline.storage import list_inputs\nprint([(f.key, f.size, f.error) for f in list_inputs(sys.argv[1])])\n"
        "try:\n    list_inputs(sys.argv[2])\nexcept PermissionError as e:\n    print(e)"
    )
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("root reads every folder, and setpriv (util-linux) is missing to run without that")
    command = [
        *(UNPRIVILEGED if os.geteuid() == 0 else []),
        sys.executable,
        "-c",
        script,
        str(src),
        str(src / "locked"),
    ]
    (src / "locked").chmod(0)
    try:
        run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    finally:
        (src / "locked").chmod(0o755)
    listed, refused = run.stdout.splitlines()
    why = "this folder cannot be listed (permission denied), so the files in it are not in the run; fix its permissions"
    assert listed == repr([("locked/", 0, why), ("ok.png", 2, None)])
    assert refused == f"[Errno 13] input {src / 'locked'} cannot be listed (permission denied); check its permissions"

    # Planned as one failed row, with no output (a folder names none): nothing is read for it.
    options = RunOptions(src=str(src), dst=str(tmp_path / "dst"))
    todo, settled = plan_inputs(options, "run", inputs=[InputFile(f"{src}/locked/", "locked/", 0, "", why)])
    assert todo == [] and [(r["key"], r["status"], r["output"], r["error"]) for r in settled] == [
        ("locked/", "failed", None, why)
    ]


def test_empty_local_folder_lists_nothing(tmp_path: Path) -> None:
    assert list_inputs(str(tmp_path)) == []


def test_missing_local_src_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no such folder")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        list_inputs(missing)


# ----------------------------------------------------------------------------- listing: S3


@pytest.mark.timeout(60)
def test_s3_listing_finds_every_image_with_its_etag(s3_bucket) -> None:
    bucket, client = s3_bucket
    put_tree(client, bucket, "in/", {**IMAGES, **NOT_INPUTS})
    client.put_object(Bucket=bucket, Key="input/sibling.png", Body=b"s")  # same leading letters, not under in/
    client.put_object(Bucket=bucket, Key="elsewhere.png", Body=b"e")

    for src in (f"s3://{bucket}/in", f"s3://{bucket}/in/"):
        listed = list_inputs(src, exclude=[f"s3://{bucket}/in/out/"])
        assert [f.key for f in listed] == sorted(IMAGES)
        for f in listed:
            assert f.uri == f"s3://{bucket}/in/{f.key}"
            assert join(src, f.key) == f.uri
            assert f.size == len(IMAGES[f.key])
            assert f.version == etag(client, bucket, "in/" + f.key)
            assert '"' not in f.version
    assert read_bytes(f"s3://{bucket}/in/fotos/ñandú 1.JPG") == IMAGES["fotos/ñandú 1.JPG"]

    whole_bucket = [f.key for f in list_inputs(f"s3://{bucket}")]
    assert "elsewhere.png" in whole_bucket and "input/sibling.png" in whole_bucket


@pytest.mark.timeout(60)
def test_s3_listing_is_one_listing_without_a_request_per_object(s3_bucket) -> None:
    bucket, client = s3_bucket
    put_tree(client, bucket, "in/", IMAGES)
    fs, _ = filesystem(f"s3://{bucket}/in")  # the cached instance list_inputs will use
    fs.connect()
    calls: list[str] = []
    fs.s3.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))

    assert len(list_inputs(f"s3://{bucket}/in")) == len(IMAGES)
    assert calls == ["ListObjectsV2"]


@pytest.mark.timeout(60)
def test_s3_key_with_dotdot_is_listed_as_stored_and_placed_inside_dst(s3_bucket, tmp_path: Path) -> None:
    bucket, client = s3_bucket
    key = "a/../../escape.png"
    client.put_object(Bucket=bucket, Key="in/" + key, Body=b"payload")  # S3 takes such keys as they are
    client.put_object(Bucket=bucket, Key="in/ok.png", Body=b"ok")

    listed = list_inputs(f"s3://{bucket}/in")
    assert [f.key for f in listed] == [key, "ok.png"]
    escaped = listed[0]
    assert escaped.uri == f"s3://{bucket}/in/{key}"
    assert read_bytes(escaped.uri) == b"payload"  # the URI still addresses the stored object

    dst = tmp_path / "dst"
    dst.mkdir()
    out = join(str(dst), escaped.key)
    assert os.path.realpath(out).startswith(str(dst) + os.sep)
    write_atomic(out, read_bytes(escaped.uri))
    assert all_files(tmp_path) == ["dst/a/%2E%2E/%2E%2E/escape.png"]

    s3_out = join(f"s3://{bucket}/out/", escaped.key)
    assert s3_out == f"s3://{bucket}/out/a/%2E%2E/%2E%2E/escape.png"


@pytest.mark.timeout(60)
def test_s3_single_object_src_is_the_one_input(s3_bucket) -> None:
    bucket, client = s3_bucket
    client.put_object(Bucket=bucket, Key="in/one file.jpg", Body=b"123")
    (f,) = list_inputs(f"s3://{bucket}/in/one file.jpg")
    assert f == InputFile(f"s3://{bucket}/in/one file.jpg", "one file.jpg", 3, etag(client, bucket, "in/one file.jpg"))


@pytest.mark.timeout(60)
def test_missing_s3_src_names_it(s3_bucket) -> None:
    bucket, client = s3_bucket
    client.put_object(Bucket=bucket, Key="in/x.png", Body=b"x")

    empty_prefix = f"s3://{bucket}/nothing/here"
    with pytest.raises(FileNotFoundError, match=re.escape(empty_prefix) + ".*no objects under this prefix"):
        list_inputs(empty_prefix)
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{bucket}/i does not exist")):
        list_inputs(f"s3://{bucket}/i")  # a prefix of a name is not a folder

    no_bucket = f"s3://isosr-missing-{uuid.uuid4().hex[:8]}/in"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{no_bucket} does not exist")):
        list_inputs(no_bucket)


@pytest.mark.timeout(60)
def test_empty_bucket_lists_nothing(s3_bucket) -> None:
    bucket, _ = s3_bucket
    assert list_inputs(f"s3://{bucket}") == []


# ----------------------------------------------------------------------------- safe_key and join

segments = st.one_of(
    st.sampled_from(["", ".", "..", "...", "\\", "..\\..", " ", "%2E%2E", "~", "a.png"]),
    st.text(max_size=8),
)
keys = st.one_of(
    st.text(),
    st.builds(
        lambda lead, parts: lead + "/".join(parts),
        st.sampled_from(["", "/", "//", "./", "../"]),
        st.lists(segments, max_size=8),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=keys)
def test_safe_key_can_never_leave_the_root(tmp_path: Path, key: str) -> None:
    root = str(tmp_path.resolve())
    try:
        safe = safe_key(key)
    except ValueError:
        assert all(part in ("", ".") for part in key.split("/"))  # only keys naming nothing are refused
        return
    assert not safe.startswith("/")
    assert all(part not in ("", ".", "..") for part in safe.split("/"))
    assert safe_key(safe) == safe
    if all(part not in ("", ".", "..") for part in key.split("/")):
        assert safe == key  # ordinary keys are kept exactly: outputs mirror the input tree

    joined = join(root, key)
    assert joined == root + "/" + safe
    assert os.path.normpath(joined).startswith(root + os.sep)
    if "\0" not in joined:  # no filesystem path can hold NUL; realpath refuses it
        assert os.path.realpath(joined).startswith(root + os.sep)


def test_safe_key_examples() -> None:
    assert safe_key("/a//./b/../c\\d.png") == "a/b/%2E%2E/c\\d.png"
    assert safe_key("../../etc/passwd") == "%2E%2E/%2E%2E/etc/passwd"
    for nothing in ("", "/", ".", "././/"):
        with pytest.raises(ValueError, match="names no file"):
            safe_key(nothing)


def test_join_never_doubles_slashes() -> None:
    assert join("s3://b/out/", "a/x.png") == "s3://b/out/a/x.png"
    assert join("s3://b/out", "/a/x.png") == "s3://b/out/a/x.png"
    assert join("/data/out//", "x.png") == "/data/out/x.png"
    assert join("file:///data/out/", "x.png") == "file:///data/out/x.png"
    assert join("/", "x.png") == "/x.png"
    assert join("file:///", "x.png") == "file:///x.png"
    with pytest.raises(ValueError, match="empty root"):
        join("", "x.png")


def test_with_suffix() -> None:
    assert with_suffix("a/b.c.png", ".jpg") == "a/b.c.jpg"
    assert with_suffix("a/noext", ".jpg") == "a/noext.jpg"
    assert with_suffix("a.d/noext", ".jpg") == "a.d/noext.jpg"  # a dot in a folder is not a suffix
    assert with_suffix("fotos/ñandú 1.JPG", ".png") == "fotos/ñandú 1.png"
    assert with_suffix(".hidden", ".png") == ".hidden.png"
    with pytest.raises(ValueError, match="suffix"):
        with_suffix("a.png", "jpg")
    with pytest.raises(ValueError, match="folder"):
        with_suffix("a/", ".jpg")


# ----------------------------------------------------------------------------- write_atomic, read, exists


def test_write_atomic_creates_parents_and_leaves_only_the_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "ñandú dir" / "x.png"
    write_atomic(str(target), b"first")
    assert target.read_bytes() == b"first"
    assert all_files(tmp_path) == ["new/ñandú dir/x.png"]

    write_atomic(str(target), b"second")
    assert read_bytes(str(target)) == b"second"
    assert all_files(tmp_path) == ["new/ñandú dir/x.png"]
    assert exists(str(target)) and exists(f"file://{target}")
    assert not exists(str(target.parent))  # a folder is not an output


def test_failed_write_names_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    # A folder already where the output should go: the data is written, the rename fails.
    target = tmp_path / "x.png"
    (target / "inside").mkdir(parents=True)
    with pytest.raises(OSError, match=re.escape(f"cannot write {target}")):
        write_atomic(str(target), b"data")
    assert all_files(tmp_path) == []
    assert target.is_dir()


def test_a_name_of_up_to_255_bytes_is_written_and_a_longer_one_fails_naming_it(tmp_path: Path) -> None:
    """The hidden temporary is longer than the name; where it would pass NAME_MAX its name is cut
    short. A name that is itself too long fails naming the output, not the temporary."""
    longest = tmp_path / ("é" * 125 + "x.png")  # 255 bytes in UTF-8
    write_atomic(str(longest), b"data")
    assert longest.read_bytes() == b"data" and all_files(tmp_path) == [longest.name]
    too_long = tmp_path / ("y" * 252 + ".png")
    with pytest.raises(OSError, match=re.escape(f"cannot write {too_long}: File name too long")):
        write_atomic(str(too_long), b"data")
    assert all_files(tmp_path) == [longest.name]


def test_write_into_read_only_folder_fails_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user writes into read-only folders anyway (root)")
        with pytest.raises(PermissionError, match=re.escape(f"cannot write {folder / 'x.png'}")):
            write_atomic(str(folder / "x.png"), b"data")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_read_bytes_of_a_missing_file_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        read_bytes(missing)
    assert not exists(missing)


@pytest.mark.timeout(60)
def test_s3_write_read_and_exists(s3_bucket) -> None:
    bucket, client = s3_bucket
    uri = f"s3://{bucket}/out/fotos/ñandú 1.png"
    assert not exists(uri)
    write_atomic(uri, b"first")
    assert client.get_object(Bucket=bucket, Key="out/fotos/ñandú 1.png")["Body"].read() == b"first"
    write_atomic(uri, b"second")
    assert read_bytes(uri) == b"second"
    assert exists(uri)
    assert not exists(f"s3://{bucket}/out/fotos")  # a prefix is not an output
    with pytest.raises(FileNotFoundError, match=re.escape(f"s3://{bucket}/out/nope.png")):
        read_bytes(f"s3://{bucket}/out/nope.png")
    no_bucket = f"s3://isosr-missing-{uuid.uuid4().hex[:8]}/x.png"
    with pytest.raises(FileNotFoundError, match=re.escape(f"cannot write {no_bucket}")):
        write_atomic(no_bucket, b"data")


@pytest.mark.timeout(60)
def test_s3_exists_sees_changes_made_after_a_listing(s3_bucket) -> None:
    # Resuming checks outputs after listing; s3fs would answer from the listing it cached.
    bucket, client = s3_bucket
    client.put_object(Bucket=bucket, Key="in/old.png", Body=b"o")
    list_inputs(f"s3://{bucket}/in")
    client.put_object(Bucket=bucket, Key="in/new.png", Body=b"n")
    client.delete_object(Bucket=bucket, Key="in/old.png")
    assert exists(f"s3://{bucket}/in/new.png")
    assert not exists(f"s3://{bucket}/in/old.png")
