"""The lease that keeps nightly runs on one DST apart: DST/_isosr/nightly/lease.json.

Acquire: create the lease if there is none (S3: PUT with If-None-Match: *; local: under an fcntl lock,
write if absent). If there is one and it is live, raise LeaseHeld, whose message names the holder (run
id, host, pid, since when, until when) and says what to do. If it is stale (expired unreleased: its run
died; or released), replace it on condition that it is still the one read (S3: If-Match on its ETag;
local: its digest, compared under the lock), so that of several runs that read one stale lease exactly
one takes it over. While the run works, Lease.kept() renews the lease every TTL/4 on the same
condition; a renewal that finds the lease changed marks it lost. At the end the lease is marked
released, so the next run takes it at once. Expiry compares wall clocks: hosts that share a DST must
agree to well within the TTL (NTP does). Times are ISO 8601 UTC with milliseconds.

Light on purpose (no Ray, no torch): any process can check or take a lease quickly.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import fsspec
import fsspec.asyn

from pipeline import storage

LEASE_PATH = f"{storage.STATE_DIR}/nightly/lease.json"  # under DST


class LeaseHeld(Exception):
    """Another run holds the lease; the message says who, until when, and what to do."""

    def __init__(self, uri: str, holder: Holder, now: float, *, runs: str) -> None:
        self.holder = holder
        super().__init__(
            f"another nightly run holds the lease {uri}: {holder.describe()}, since {holder.acquired}, last renewed "
            f"{holder.renewed}, expires {holder.expires} (in {_duration(holder.expires_at - now)}). Nothing was done. "
            f"If that run is working, let it finish: its report will be in {runs}. If it died, its lease expires by "
            f"itself and the next run takes over and resumes its work. If you know it is dead (pid {holder.pid} is "
            f"gone from {holder.host}) and cannot wait, delete {uri} and run again."
        )


class LeaseLost(Exception):
    """This run's lease was taken over (it could not renew it in time)."""


class LeaseUnreadable(ValueError):
    """lease.json holds something isosr did not write; the message names the file and what to do."""


@dataclass(frozen=True)
class Holder:
    """The content of lease.json. Times are ISO 8601 UTC; `expires` passed or `released` set: stale."""

    run_id: str
    host: str
    pid: int
    acquired: str
    renewed: str
    expires: str
    released: str | None = None

    @property
    def expires_at(self) -> float:
        return datetime.fromisoformat(self.expires).timestamp()

    def live(self, now: float) -> bool:
        return self.released is None and self.expires_at > now

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on host {self.host})"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def encode(self) -> bytes:
        return json.dumps(self.as_dict(), indent=1).encode()

    @classmethod
    def decode(cls, data: bytes, uri: str) -> Holder:
        try:
            fields = json.loads(data)
            return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})
        except (ValueError, KeyError, TypeError) as e:
            raise LeaseUnreadable(
                f"the lease {uri} is not one isosr wrote ({e}); if no nightly run is working on this DST, delete it"
            ) from None


class Lease:
    """A lease on DST for one nightly run, in DST/_isosr/nightly/lease.json.

    Acquire: create the lease if there is none (S3: PUT with If-None-Match: *; local: under an fcntl
    lock, write if absent). If there is one and it is live, raise LeaseHeld. If it is stale (expired,
    or released), replace it on condition that it is still the one read (S3: If-Match on its ETag;
    local: its digest, compared under the lock): of several runs that read the same stale lease,
    exactly one takes it over. While the run works, `kept()` renews it every ttl/4 on the same
    condition; a renewal that finds the lease changed marks it lost. At the end the lease is marked
    released. Hosts' clocks must agree to well within the TTL (NTP does).
    """

    def __init__(self, dst: str, *, run_id: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"a lease must last more than 0 seconds, got {ttl_s:g}")
        self.dst = dst
        self.uri = storage.join(dst, LEASE_PATH)
        self.run_id = run_id
        self.ttl_s = float(ttl_s)
        fs, _ = storage.filesystem(self.uri)
        self._store: _S3Object | _LocalObject = _S3Object(self.uri) if speaks(fs, "s3") else _LocalObject(self.uri)
        self._tag: str | None = None  # ETag (or digest) of the lease as this run last wrote it
        self._acquired = ""
        self.lost: str | None = None  # why the lease was lost, once it is

    def _holder(self, now: float, *, released: bool = False) -> Holder:
        stamp = _iso(now)
        return Holder(
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired=self._acquired or stamp,
            renewed=stamp,
            expires=stamp if released else _iso(now + self.ttl_s),
            released=stamp if released else None,
        )

    def acquire(self) -> Holder | None:
        """Take the lease. Returns the holder whose lease expired unreleased (it died) when this run took
        it over, else None. Raises LeaseHeld."""
        for _ in range(5):  # each pass ends in success, LeaseHeld, or a lost race that changed the lease
            now = time.time()
            tag = self._store.create(self._holder(now).encode())
            if tag is not None:
                self._tag, self._acquired = tag, _iso(now)
                return None
            current = self._store.read()
            if current is None:
                continue  # deleted meanwhile
            data, current_tag = current
            holder = Holder.decode(data, self.uri)
            if holder.run_id == self.run_id:  # our create went through though its answer was lost
                self._tag, self._acquired = current_tag, holder.acquired
                return None
            if holder.live(now):
                runs = storage.run_dir(self.dst, holder.run_id) + "/"  # where the holder's run files go
                raise LeaseHeld(self.uri, holder, now, runs=runs)
            tag = self._store.replace(self._holder(now).encode(), current_tag)
            if tag is not None:
                self._tag, self._acquired = tag, _iso(now)
                return holder if holder.released is None else None
        raise RuntimeError(f"the lease {self.uri} kept changing while this run tried to take it; try again")

    def renew(self) -> None:
        """Extend the lease by the TTL from now. Raises LeaseLost when another run has taken it."""
        self._write(self._holder(time.time()))

    def release(self) -> None:
        """Mark the lease released, so that the next run takes it at once. Raises LeaseLost."""
        self._write(self._holder(time.time(), released=True))

    def _write(self, holder: Holder) -> None:
        if self._tag is None:
            raise LeaseLost(f"run {self.run_id} does not hold the lease {self.uri}")
        tag = self._store.replace(holder.encode(), self._tag)
        if tag is None:
            current = self._store.read()
            if current is not None and Holder.decode(current[0], self.uri) == holder:
                tag = current[1]  # our write went through though its answer was lost
            else:
                self._tag = None
                other = Holder.decode(current[0], self.uri).describe() if current else "nobody"
                raise LeaseLost(f"the lease {self.uri} is now held by {other}")
        self._tag = tag

    @contextmanager
    def kept(self, *, log: TextIO) -> Iterator[Lease]:
        """Renew the lease from a thread while the block runs; release it at the end, however it ends."""
        stop = threading.Event()
        interval = self.ttl_s / 4
        expires = time.time() + self.ttl_s

        def heartbeat() -> None:
            nonlocal expires
            while not stop.wait(interval):
                try:
                    self.renew()
                    expires = time.time() + self.ttl_s
                except LeaseLost as e:
                    self.lost = str(e)
                    print(f"isosr nightly: LEASE LOST: {e}; this run will not record its state", file=log)
                    return
                except Exception as e:  # noqa: BLE001 - a store hiccup: try again at the next beat
                    if time.time() >= expires:
                        self.lost = f"could not renew it before it expired ({e})"
                        print(f"isosr nightly: LEASE LOST: {self.lost}", file=log)
                        return
                    print(f"isosr nightly: could not renew the lease ({e}); trying again in {interval:.0f} s", file=log)

        thread = threading.Thread(target=heartbeat, name="isosr-lease", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            if self.lost is None:
                try:
                    self.release()
                except Exception as e:  # noqa: BLE001 - the lease then expires by itself after its TTL
                    print(
                        f"isosr nightly: could not release the lease {self.uri} ({e}); it expires by itself", file=log
                    )


class _S3Object:
    """lease.json on S3, written only with conditional PUTs; its tag is the ETag."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, path = storage.filesystem(uri)
        self.bucket, self.key = path.split("/", 1)

    def read(self) -> tuple[bytes, str] | None:
        # One GET, so that the body and the ETag are of the same version (cat_file and then info()
        # could pair an old body with a newer ETag, and a replace on that ETag would take over a lease
        # renewed in between). s3fs has no public call that returns both.
        async def get() -> tuple[bytes, str] | None:
            try:
                response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                return None
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        return fsspec.asyn.sync(self.fs.loop, get)

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, tag: str) -> str | None:
        return self._put(data, IfMatch=tag)

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except Exception as e:
            if _precondition_failed(e):
                return None
            raise OSError(f"cannot write the lease {self.uri}: {e}") from e


def _precondition_failed(error: BaseException) -> bool:
    """Whether S3 refused a conditional write (412, or 409 for a concurrent conditional write).
    s3fs turns the ClientError into an OSError; the original is its __cause__."""
    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)
        seen = seen.__cause__ or seen.__context__
    return isinstance(error, FileExistsError)


_LOCAL_MUTEX = threading.Lock()  # fcntl locks belong to the process: threads also need this


class _LocalObject:
    """lease.json in a local folder; writes happen under an fcntl lock on lease.json.lock (POSIX
    record locks also hold on NFS), so read-compare-write is atomic; its tag is the content's sha256."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.path = storage.filesystem(uri)[1]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with _LOCAL_MUTEX, open(self.path + ".lock", "a+b") as f:
            fcntl.lockf(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(f, fcntl.LOCK_UN)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        with self._locked():
            if os.path.exists(self.path):
                return None
            storage.write_atomic(self.path, data)
        return hashlib.sha256(data).hexdigest()

    def replace(self, data: bytes, tag: str) -> str | None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != tag:
                return None
            storage.write_atomic(self.path, data)
        return hashlib.sha256(data).hexdigest()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat(timespec="milliseconds")


def speaks(fs: fsspec.AbstractFileSystem, protocol: str) -> bool:
    """Whether `fs` is a filesystem of `protocol` ("s3", "file")."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return protocol in protocols


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
