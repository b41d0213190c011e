"""Nightly incremental runs: `isosr nightly SRC DST` upscales only the inputs that are new or changed
since they were last processed, never runs twice at once on one DST, and resumes an interrupted run.

What is processed. An input is judged by its key, size and version (the S3 ETag, or the file's mtime:
storage.InputFile) and by the model that processed it (the checkpoint's sha256, ModelSource.version).
It is processed when it has no record, when any of these differ from its record, when its output
would now go elsewhere (e.g. another --format), or when it failed and --retry-failed is given. An input that failed and has not changed since is not retried every
night: a bad file stays bad, and retrying it nightly would only repeat the error. Its manifest row
(skipped) says when it failed and why, and the report counts it; replacing the file, a new model or
--retry-failed retries it.

State, under DST/_isosr/nightly/ (storage.STATE_DIR):

    lease.json                        who is running now (pipeline.lease)
    state/snapshot-<run_id>.parquet   one record per input (STATE_SCHEMA): key, size, version, model,
                                      status ok|failed, error, output, run_id (the run that processed
                                      it) and `recovered` (how it was recovered from an interrupted run)
    state/plan-<run_id>.parquet       what a run set out to process (PLAN_SCHEMA), written before any
                                      output; it outlives the run only if the run did not commit

Loading costs one listing of state/ and one GET of the newest snapshot, whatever the number of inputs.
A run that processed or recovered something commits: it writes a new snapshot (one PUT on S3, a
rename locally: storage.write_atomic), then deletes the plans it folded in and all but the newest
KEEP_SNAPSHOTS snapshots. A run with nothing to do writes no state, only its run files. Run ids begin
with their UTC start time, so names sort by age; where two records of one key meet, the later run's
wins, which makes folding a plan in twice harmless.

Completion record. A plan without a commit is an interrupted run (driver killed, machine lost, lease
lost). The next run folds it in before it plans; an input counts as done by the interrupted run iff

  - a manifest row of that run says so (ok or failed): its manifest.parquet, or, when it died before
    writing that, the parts its writers left in runs/<run_id>/parts/ (pipeline.sink and
    pipeline.assembly write a part after each block's outputs), or
  - its output exists and was last modified after the plan was written: this closes the window in
    which an output is written but its part is not yet. Both times come from the store's own clock
    (S3 LastModified, file mtimes), and the lease guarantees that no other nightly run wrote to DST
    meanwhile. "After" is strict: an output left by an earlier run in the same second as the plan (S3
    times have 1 s resolution) is redone rather than wrongly taken as done.

Everything else in the plan is processed by the resuming run: no input is processed twice and none is
lost. Recovered records keep the interrupted run's id; `recovered` says "manifest", "parts" or
"output". Local temporary files of writes that were cut off, and the run's staging area, are removed.

Exit status (pipeline.cli): 0 when nothing failed in this run, 3 when some inputs failed, 2 on a usage
error, EXIT_LEASE (4) when another run holds the lease or this run lost it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import shards, storage
from pipeline.assembly import RunPaths
from pipeline.lease import Lease, LeaseLost, LeaseUnreadable, speaks
from pipeline.manifest import FAILED, OK, SKIPPED
from pipeline.run import (
    RunOptions,
    RunResult,
    UsageError,
    execute,
    new_run_id,
    output_of,
    plan_inputs,
    prepare,
    resolve_inputs,
)

EXIT_LEASE = 4
DEFAULT_LEASE_TTL_S = 300
KEEP_SNAPSHOTS = 3
NIGHTLY_DIR = f"{storage.STATE_DIR}/nightly"

NEW, CHANGED, MODEL, OUTPUT, RETRY = "new", "changed", "model", "output", "retry"  # why an input is processed

STATE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("size_bytes", pa.int64()),
        ("source_version", pa.string()),
        ("model_sha256", pa.string()),
        ("status", pa.string()),  # ok | failed
        ("error", pa.string()),
        ("output", pa.string()),
        ("run_id", pa.string()),  # the run that processed the input
        ("recovered", pa.string()),  # null, or how it was recovered: manifest | parts | output
    ]
)
PLAN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("size_bytes", pa.int64()),
        ("source_version", pa.string()),
        ("model_sha256", pa.string()),
        ("output", pa.string()),
        ("reason", pa.string()),  # new | changed | model | output | retry
    ]
)
# storage.write_atomic's local temporaries: ".<name>.tmp-<pid>-<8 hex>"
_LOCAL_TEMPORARY = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")


@dataclass(frozen=True, kw_only=True)
class NightlyOptions:
    run: RunOptions  # skip_existing is ignored: the state, not the outputs, says what to process
    retry_failed: bool = False
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S


@dataclass
class NightlyResult:
    result: RunResult
    notes: dict[str, Any]  # report.json's "nightly" entry
    committed: bool  # a new state snapshot was written


def nightly(options: NightlyOptions, *, log: TextIO | None = None) -> NightlyResult:
    """One incremental run of options.run.src into options.run.dst (see the module docstring).
    Raises UsageError, FileNotFoundError and CheckpointError before any work starts, LeaseHeld when
    another run holds DST's lease, and LeaseLost when this run lost it while working (its outputs are
    written, its state is not: the next run recovers them)."""
    log = log or sys.stderr
    started = time.perf_counter()
    run_options = dataclasses.replace(options.run, skip_existing=False)
    dst = run_options.dst
    fs, _ = storage.filesystem(dst)
    if not (speaks(fs, "s3") or speaks(fs, "file")):
        raise UsageError(
            f"isosr nightly keeps a lease in DST, which needs a local folder or s3:// (conditional writes); "
            f"{dst} is neither"
        )
    source = prepare(run_options)
    run_id = new_run_id()
    lease = Lease(dst, run_id=run_id, ttl_s=options.lease_ttl_s)
    try:
        previous = lease.acquire()
    except LeaseUnreadable as e:
        raise UsageError(str(e)) from None
    except OSError as e:  # e.g. a bucket that does not exist, a folder that is not writable
        raise UsageError(f"{e}; check that DST ({dst}) can be written") from None
    with lease.kept(log=log):
        if previous is not None:
            print(f"isosr nightly: took over the expired lease of {previous.describe()}", file=log)
        state = load_state(dst)
        recovered = recover(dst, state)
        for r in recovered:
            print(
                f"isosr nightly: resumed interrupted run {r['run_id']}: {r['done']} of its {r['planned']} planned "
                f"inputs were done ({r['from_records']} recorded, {r['from_outputs']} found written after its plan), "
                f"{r['planned'] - r['done']} are left to redo",
                file=log,
            )
        run_options, inputs = resolve_inputs(run_options, log=log)
        changes = diff(
            inputs,
            state.records,
            model_version=source.version,
            output=lambda key: output_of(run_options, key)[1],
            retry_failed=options.retry_failed,
        )
        todo: list[dict[str, Any]] = []
        clashes: list[dict[str, Any]] = []
        if changes.todo:
            todo, clashes = plan_inputs(run_options, run_id, inputs=inputs, only=set(changes.todo))
            write_plan(dst, run_id, todo, changes.todo, model_version=source.version)
        counts = changes.counts()
        notes = {
            "nightly": {
                "counts": counts,
                "processed": len(todo),
                "retry_failed": options.retry_failed,
                "recovered": recovered,
                "took_over": previous.as_dict() if previous else None,
                "model_sha256": source.version,
            }
        }
        print(f"isosr nightly: run {run_id}: {summary_of(counts)}", file=log)
        settled = clashes + settled_rows(changes, inputs, state.records, run_id)
        result = execute(
            run_options, source=source, run_id=run_id, todo=todo, settled=settled, started=started, log=log, notes=notes
        )
        if lease.lost:
            raise LeaseLost(
                f"run {run_id} lost its lease while working ({lease.lost}); its outputs are written, and the next "
                f"run takes them over from {RunPaths(dst=dst, run_id=run_id).run_dir}/ without redoing them"
            )
        committed = bool(todo or clashes or recovered or changes.gone)
        if committed:
            listed = {f.key: {"size_bytes": f.size, "source_version": f.version,
                              "output": output_of(run_options, f.key)[1] if f.error is None else None}
                      for f in inputs}  # fmt: skip
            outcomes = shards.by_input(result.manifest.to_pylist(), listed)
            commit(dst, state, run_id, outcomes, keep=set(listed), model_version=source.version)
    return NightlyResult(result, notes["nightly"], committed)


def summary_of(counts: dict[str, int]) -> str:
    """One line a user reads: what is processed and why, what is left alone."""
    processed = counts[NEW] + counts[CHANGED] + counts["model_changed"] + counts["output_changed"] + counts["retried"]
    return (
        f"{processed} to process (new {counts[NEW]}, changed {counts[CHANGED]}, model changed "
        f"{counts['model_changed']}, output changed {counts['output_changed']}, retried {counts['retried']}); "
        f"unchanged {counts['unchanged']}, failed before "
        f"and unchanged {counts['failed_unchanged']} (not retried; --retry-failed), gone from SRC {counts['gone']}"
    )


# ----------------------------------------------------------------------------- what changed


@dataclass(frozen=True)
class Diff:
    todo: dict[str, str]  # key -> why it is processed (NEW, CHANGED, MODEL, OUTPUT, RETRY)
    unchanged: list[str]  # keys done before (ok) and unchanged since
    failed_unchanged: list[str]  # keys that failed before, unchanged since, not retried
    gone: list[str]  # keys with a record that are no longer under SRC

    def counts(self) -> dict[str, int]:
        reasons = list(self.todo.values())
        return {
            NEW: reasons.count(NEW),
            CHANGED: reasons.count(CHANGED),
            "model_changed": reasons.count(MODEL),
            "output_changed": reasons.count(OUTPUT),
            "retried": reasons.count(RETRY),
            "unchanged": len(self.unchanged),
            "failed_unchanged": len(self.failed_unchanged),
            "gone": len(self.gone),
        }


def diff(
    inputs: list[storage.InputFile],
    records: dict[str, dict[str, Any]],
    *,
    model_version: str,
    output: Callable[[str], str],
    retry_failed: bool,
) -> Diff:
    """Sort SRC's listing against the records (see the module docstring); `output` gives the output
    URI an input's key would have now."""
    todo: dict[str, str] = {}
    unchanged, failed_unchanged = [], []
    for f in inputs:
        rec = records.get(f.key)
        if rec is None:
            todo[f.key] = NEW
        elif rec["size_bytes"] != f.size or rec["source_version"] != f.version:
            todo[f.key] = CHANGED
        elif rec["model_sha256"] != model_version:
            todo[f.key] = MODEL
        elif rec["status"] == OK and rec["output"] != output(f.key):
            todo[f.key] = OUTPUT
        elif rec["status"] != OK:
            if retry_failed:
                todo[f.key] = RETRY
            else:
                failed_unchanged.append(f.key)
        else:
            unchanged.append(f.key)
    listed = {f.key for f in inputs}
    return Diff(todo, unchanged, failed_unchanged, sorted(set(records) - listed))


def settled_rows(
    changes: Diff, inputs: list[storage.InputFile], records: dict[str, dict[str, Any]], run_id: str
) -> list[dict[str, Any]]:
    """Manifest rows (skipped) for the inputs left alone, saying since when and why."""
    by_key = {f.key: f for f in inputs}
    rows = []
    for key in changes.unchanged + changes.failed_unchanged:
        f, rec = by_key[key], records[key]
        if rec["status"] == OK:
            output, error = rec["output"], f"unchanged since run {rec['run_id']}"
        else:
            output = None
            error = f"failed in run {rec['run_id']} and unchanged since; not retried (--retry-failed): {rec['error']}"
        rows.append(
            {
                "run_id": run_id,
                "source": f.uri,
                "key": key,
                "size_bytes": f.size,
                "source_version": f.version,
                "status": SKIPPED,
                "error": error,
                "output": output,
            }
        )
    return rows


# ----------------------------------------------------------------------------- state


@dataclass
class State:
    records: dict[str, dict[str, Any]]  # key -> record (STATE_SCHEMA's columns)
    snapshots: list[str]  # URIs of the snapshots, oldest first
    plans: list[tuple[str, float]]  # (run_id, when its plan was written: store's clock, s) of uncommitted runs


def state_dir(dst: str) -> str:
    return storage.join(dst, f"{NIGHTLY_DIR}/state")


def load_state(dst: str) -> State:
    """The records of the newest snapshot and the uncommitted plans: one listing, one read."""
    fs, root = storage.filesystem(state_dir(dst))
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        found = {}
    snapshots, plans = [], []
    for path, info in sorted(found.items()):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("snapshot-") and name.endswith(".parquet"):
            snapshots.append(f"{state_dir(dst)}/{name}")
        elif name.startswith("plan-") and name.endswith(".parquet"):
            plans.append((name[len("plan-") : -len(".parquet")], _modified(info)))
    records: dict[str, dict[str, Any]] = {}
    if snapshots:
        table = _read_table(snapshots[-1])
        records = {r["key"]: r for r in table.to_pylist()}
    return State(records, snapshots, plans)


def write_plan(
    dst: str, run_id: str, todo: list[dict[str, Any]], reasons: dict[str, str], *, model_version: str
) -> None:
    """Record what this run sets out to process, before any of it is written."""
    rows = [
        {
            "key": r["key"],
            "size_bytes": r["size_bytes"],
            "source_version": r["source_version"],
            "model_sha256": model_version,
            "output": r["output"],
            "reason": reasons[r["key"]],
        }
        for r in todo
    ]
    _write_table(f"{state_dir(dst)}/plan-{run_id}.parquet", pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))


def recover(dst: str, state: State) -> list[dict[str, Any]]:
    """Fold the uncommitted plans of interrupted runs into state.records (see the module docstring);
    one summary per run: run_id, planned, done, from_records, from_outputs."""
    summaries = []
    outputs: dict[str, float] | None = None  # DST's files -> modified time, listed once if needed
    for run_id, plan_time in state.plans:
        paths = RunPaths(dst=dst, run_id=run_id)
        plan = {r["key"]: r for r in _read_table(f"{state_dir(dst)}/plan-{run_id}.parquet").to_pylist()}
        done: dict[str, dict[str, Any]] = {}
        rows, how = _run_rows(paths)
        for row in shards.by_input(rows, plan):
            p = plan.get(row["key"])
            if p is not None and row["status"] in (OK, FAILED):
                done[row["key"]] = _record(p, status=row["status"], error=row["error"], run_id=run_id, recovered=how)
        from_records = len(done)
        # A shard's first output file says nothing of the others: only its rows' records count.
        missing = [p for key, p in plan.items() if key not in done and shards.kind_of(key) == shards.IMAGES]
        if missing:
            if outputs is None:
                outputs = _files_modified(dst)
            for p in missing:
                modified = outputs.get(storage.filesystem(p["output"])[1])
                if modified is not None and modified > plan_time:
                    done[p["key"]] = _record(p, status=OK, error=None, run_id=run_id, recovered="output")
            _remove_local_temporaries(dst, outputs, since=plan_time)
        storage.remove(f"{paths.run_dir}/staging")
        for key, rec in done.items():
            held = state.records.get(key)
            if held is None or held["run_id"] <= run_id:
                state.records[key] = rec
        summaries.append(
            {
                "run_id": run_id,
                "planned": len(plan),
                "done": len(done),
                "from_records": from_records,
                "from_outputs": len(done) - from_records,
            }
        )
    return summaries


def commit(
    dst: str, state: State, run_id: str, outcomes: list[dict[str, Any]], *, keep: set[str], model_version: str
) -> str:
    """Write the new snapshot: the records of inputs still under SRC (`keep`), updated with this run's
    ok and failed outcomes (manifest rows, a shard's as one: shards.by_input); then delete the folded
    plans and old snapshots. Returns the snapshot's URI."""
    records = {k: r for k, r in state.records.items() if k in keep}
    for row in outcomes:
        if row["status"] in (OK, FAILED):
            records[row["key"]] = _record(
                row, status=row["status"], error=row.get("error"), run_id=run_id, recovered=None
            )
            records[row["key"]]["model_sha256"] = model_version  # a row that failed before the model has none
    uri = f"{state_dir(dst)}/snapshot-{run_id}.parquet"
    _write_table(uri, pa.Table.from_pylist(sorted(records.values(), key=lambda r: r["key"]), schema=STATE_SCHEMA))
    for plan_run, _ in state.plans:
        storage.remove(f"{state_dir(dst)}/plan-{plan_run}.parquet")
    storage.remove(f"{state_dir(dst)}/plan-{run_id}.parquet")
    for old in (state.snapshots + [uri])[:-KEEP_SNAPSHOTS]:
        storage.remove(old)
    return uri


def _record(
    row: dict[str, Any], *, status: str, error: str | None, run_id: str, recovered: str | None
) -> dict[str, Any]:
    return {
        "key": row["key"],
        "size_bytes": row["size_bytes"],
        "source_version": row["source_version"],
        "model_sha256": row.get("model_sha256"),
        "status": status,
        "error": error,
        "output": row["output"] if status == OK else None,
        "run_id": run_id,
        "recovered": recovered,
    }


def _run_rows(paths: RunPaths) -> tuple[list[dict[str, Any]], str]:
    """The manifest rows an interrupted run left: its manifest if it got to write one, else its parts."""
    manifest = f"{paths.run_dir}/manifest.parquet"
    if storage.exists(manifest):
        return _read_table(manifest).to_pylist(), "manifest"
    fs, parts = storage.filesystem(f"{paths.run_dir}/parts")
    fs.invalidate_cache(parts)
    try:
        names = sorted(fs.find(parts))
    except FileNotFoundError:
        names = []
    rows = []
    for path in names:
        if path.endswith(".parquet"):
            rows += pq.read_table(pa.BufferReader(fs.cat_file(path))).to_pylist()
    return rows, "parts"


def _files_modified(dst: str) -> dict[str, float]:
    fs, root = storage.filesystem(dst)
    fs.invalidate_cache(root)
    try:
        return {path: _modified(info) for path, info in fs.find(root, detail=True).items()}
    except FileNotFoundError:
        return {}


def _remove_local_temporaries(dst: str, files: dict[str, float], *, since: float) -> None:
    """Temporaries of local writes that a kill cut off (storage.write_atomic's), made after `since`."""
    if not speaks(storage.filesystem(dst)[0], "file"):
        return  # an S3 object appears only once complete; nothing is left half-written
    for path, modified in files.items():
        if modified > since and _LOCAL_TEMPORARY.match(os.path.basename(path)):
            storage.remove(path)


def _modified(info: dict[str, Any]) -> float:
    """Last modification (s since the epoch) from a listing entry: S3 LastModified or a file's mtime."""
    when = info.get("LastModified", info.get("mtime"))
    if isinstance(when, datetime):
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    if when is None:
        raise ValueError(f"the listing of {info.get('name')} gives no modification time")
    return float(when)


def _read_table(uri: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)))


def _write_table(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_atomic(uri, sink.getvalue().to_pybytes())
