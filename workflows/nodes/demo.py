"""Node types of the demo workflows in workflows/demo_definitions/.

They show the patterns DESIGN §4 describes: batches with checkpoints, idempotent
writes keyed by ``ctx.idempotency_key``, fan-out/fan-in through outputs, retries of
a flaky call, and a slow node that stops at its soft timeout and resumes.
"""

import csv
import itertools
import json
import os
import random
import time
from datetime import date, timedelta
from pathlib import Path

from django.conf import settings

from workflows.definitions.registry import Param, PermanentError, SoftTimeout, node_type

REGIONS = ["north", "south", "east", "west", "central"]
PRODUCTS = ["widget", "gadget", "gizmo", "doohickey", "sprocket", "flange"]


def _data_path(relative: str) -> Path:
    """A file under KEEL_DATA_DIR. Refused: an absolute path, "..", an empty one (the
    directory itself: its temporary file went beside it), and one that a symlink leads
    out of the directory."""
    root = Path(settings.KEEL_DATA_DIR).resolve()
    path = Path(relative)
    resolved = (root / path).resolve()
    if (
        path.is_absolute()
        or ".." in path.parts
        or resolved == root
        or not resolved.is_relative_to(root)
    ):
        raise PermanentError(
            f"{relative!r} must name a file inside KEEL_DATA_DIR, as a relative path"
        )
    return Path(settings.KEEL_DATA_DIR) / path


def _write_atomically(path: Path, text: str) -> None:
    """Write then rename: a reader never sees half a file, and a retry overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# --- (a) CSV ETL ------------------------------------------------------------------------------


@node_type(
    "demo.generate_sales",
    params={"path": str, "rows": Param(int, default=100_000), "seed": Param(int, default=7)},
    side_effects=True,
)
def generate_sales(ctx):
    """Generates a deterministic sales CSV (once; an existing complete file is reused)."""
    path = _data_path(ctx.params["path"])
    rows = ctx.params["rows"]
    marker = path.with_suffix(".done")
    if not (path.exists() and marker.exists() and marker.read_text() == str(rows)):
        rng = random.Random(ctx.params["seed"])
        start = date(2026, 1, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        with temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "day", "region", "product", "quantity", "unit_price"])
            for row_id in range(1, rows + 1):
                writer.writerow(
                    [
                        row_id,
                        (start + timedelta(days=rng.randrange(365))).isoformat(),
                        rng.choice(REGIONS),
                        rng.choice(PRODUCTS),
                        rng.randint(1, 20),
                        f"{rng.uniform(1, 100):.2f}",
                    ]
                )
        os.replace(temporary, path)
        marker.write_text(str(rows))
        ctx.log.info("generated %d rows in %s", rows, path)
    return {"path": ctx.params["path"], "rows": rows}


@node_type("demo.extract_csv", params={"batch_size": Param(int, default=1000)}, side_effects=True)
def extract_csv(ctx):
    """Reads the CSV in batches; each batch is staged as its own file, then checkpointed.

    The checkpoint holds the byte offset, so a new attempt seeks straight to where the
    last one stopped; a batch staged but not checkpointed is simply written again
    under the same name.
    """
    source = _data_path(ctx.inputs["generate"]["path"])
    staging = _data_path(f"staging/{ctx.idempotency_key}")
    state = ctx.checkpoint_state or {"offset": None, "rows": 0, "parts": 0}
    with source.open("rb") as handle:
        header = handle.readline()
        if state["offset"] is not None:
            handle.seek(state["offset"])
        while True:
            lines = [handle.readline() for _ in range(ctx.params["batch_size"])]
            lines = [line for line in lines if line]
            if not lines:
                break
            part = staging / f"part-{state['parts']:05d}.csv"
            _write_atomically(part, (header + b"".join(lines)).decode())
            state = {
                "offset": handle.tell(),
                "rows": state["rows"] + len(lines),
                "parts": state["parts"] + 1,
            }
            ctx.checkpoint(state)
            ctx.progress(state["rows"], ctx.inputs["generate"]["rows"])
            if ctx.should_stop():
                raise SoftTimeout(
                    f"stopped after {state['rows']} rows; the next attempt resumes there"
                )
    ctx.log.info("staged %d rows in %d parts", state["rows"], state["parts"])
    return {
        "staging": str(staging.relative_to(settings.KEEL_DATA_DIR)),
        "rows": state["rows"],
        "parts": state["parts"],
    }


@node_type("demo.transform_sales")
def transform_sales(ctx):
    """Aggregates revenue and quantity per region from the staged parts."""
    staged = ctx.inputs["extract"]
    revenue: dict[str, float] = {}
    quantity: dict[str, int] = {}
    rows = 0
    for part in sorted(_data_path(staged["staging"]).glob("part-*.csv")):
        with part.open(newline="") as handle:
            for record in csv.DictReader(handle):
                amount = int(record["quantity"]) * float(record["unit_price"])
                revenue[record["region"]] = revenue.get(record["region"], 0.0) + amount
                quantity[record["region"]] = quantity.get(record["region"], 0) + int(
                    record["quantity"]
                )
                rows += 1
    if rows != staged["rows"]:
        raise PermanentError(f"staged {staged['rows']} rows but read back {rows}")
    return {
        "rows": rows,
        "revenue_by_region": {region: round(value, 2) for region, value in sorted(revenue.items())},
        "quantity_by_region": dict(sorted(quantity.items())),
    }


@node_type(
    "demo.load_summary", params={"table": Param(str, default="sales_summary")}, side_effects=True
)
def load_summary(ctx):
    """Loads the summary into the 'warehouse' (a JSON file keyed by run): idempotent."""
    target = _data_path(f"warehouse/{ctx.params['table']}/{ctx.idempotency_key}.json")
    _write_atomically(target, json.dumps(ctx.inputs["transform"], indent=2, sort_keys=True))
    return {
        "path": str(target.relative_to(settings.KEEL_DATA_DIR)),
        "rows": ctx.inputs["transform"]["rows"],
    }


@load_summary.compensate
def unload_summary(ctx, output):
    _data_path(output["path"]).unlink(missing_ok=True)


# --- (b) fan-out / fan-in ---------------------------------------------------------------------


@node_type("demo.sum_of_squares", params={"start": int, "end": int})
def sum_of_squares(ctx):
    """One shard: the sum of squares of start..end-1."""
    return {
        "start": ctx.params["start"],
        "end": ctx.params["end"],
        "total": sum(value * value for value in range(ctx.params["start"], ctx.params["end"])),
    }


@node_type("demo.combine")
def combine(ctx):
    """Fan-in: adds the shards' totals and checks they cover one contiguous range."""
    shards = sorted(ctx.inputs.values(), key=lambda shard: shard["start"])
    for left, right in itertools.pairwise(shards):
        if left["end"] != right["start"]:
            raise PermanentError(f"shards do not line up: {left['end']} != {right['start']}")
    return {"shards": len(shards), "total": sum(shard["total"] for shard in shards)}


# --- (c) flaky and slow -----------------------------------------------------------------------


class UpstreamUnavailable(ConnectionError):
    """The pretend remote service did not answer."""


@node_type("demo.flaky_fetch", params={"failure_rate": Param(float, default=0.5)})
def flaky_fetch(ctx):
    """Calls a pretend service that fails at random; retried with backoff."""
    if random.random() < ctx.params["failure_rate"]:
        ctx.log.warning("attempt %d: the service did not answer", ctx.attempt)
        raise UpstreamUnavailable(f"service unavailable (attempt {ctx.attempt})")
    ctx.log.info("attempt %d: fetched", ctx.attempt)
    return {"fetched_on_attempt": ctx.attempt}


@node_type(
    "demo.slow_steps",
    params={"steps": Param(int, default=12), "step_seconds": Param(float, default=1.0)},
)
def slow_steps(ctx):
    """Works step by step; at the soft timeout it checkpoints and stops, and the next
    attempt carries on from there."""
    state = ctx.checkpoint_state or {"done": 0}
    if state["done"]:
        ctx.log.info("resuming at step %d of %d", state["done"], ctx.params["steps"])
    while state["done"] < ctx.params["steps"]:
        if ctx.should_stop():
            raise SoftTimeout(f"soft timeout after step {state['done']} of {ctx.params['steps']}")
        time.sleep(ctx.params["step_seconds"])
        state = {"done": state["done"] + 1}
        ctx.checkpoint(state)
        ctx.progress(state["done"], ctx.params["steps"])
    return {"steps": state["done"], "attempts": ctx.attempt}


# --- (d) something to recover -----------------------------------------------------------------
#
# A pipeline that fails on its first run for a reason a newcomer can read and fix: its
# input file has not arrived yet. The failure message says so, and says to resume; on
# resume the file is there and the run finishes. It gives `make run` a failed run with
# buttons that have real work to do (issue 3, item 7).


def _orders_paths(run_id: int) -> tuple[Path, Path]:
    """Where the shop's export is written while in transit, and where it lands."""
    name = f"orders-run{run_id}.csv"
    return _data_path(f"inbox/.incoming/{name}"), _data_path(f"inbox/{name}")


@node_type(
    "demo.request_orders_export",
    params={"rows": Param(int, default=500), "seed": Param(int, default=11)},
)
def request_orders_export(ctx):
    """Asks the pretend shop for the day's orders; the file arrives later, in the inbox.

    A new request replaces an earlier delivery (from a previous database, say), so the
    import of every new run meets the late file once.
    """
    incoming, landed = _orders_paths(ctx.run_id)
    landed.unlink(missing_ok=True)
    rng = random.Random(ctx.params["seed"] + ctx.run_id)
    lines = ["order_id,amount"] + [
        f"{number},{rng.randint(5, 500)}" for number in range(1, ctx.params["rows"] + 1)
    ]
    _write_atomically(incoming, "\n".join(lines) + "\n")
    ctx.log.info("requested the orders export; it will land in %s", landed.parent.name)
    return {
        "file": str(landed.relative_to(settings.KEEL_DATA_DIR)),
        "rows": ctx.params["rows"],
    }


@node_type("demo.import_orders", params={"batch_size": Param(int, default=100)})
def import_orders(ctx):
    """Imports the orders file in checkpointed batches; fails if the file is not there yet."""
    incoming, landed = _orders_paths(ctx.run_id)
    relative = ctx.inputs["request_export"]["file"]
    if not landed.exists():
        if incoming.exists():
            # The shop's export is late: in this demo it lands just after this failure,
            # so that resuming the run is the fix.
            os.replace(incoming, landed)
        ctx.log.error("%s is not in the inbox yet", relative)
        raise PermanentError(
            f"The orders file {relative} had not arrived when the import ran (the shop "
            "delivers its export late). It is in the inbox now: resume the run to import it."
        )
    with landed.open() as handle:
        amounts = [int(line.split(",")[1]) for line in handle.read().splitlines()[1:] if line]
    state = ctx.checkpoint_state or {"imported": 0, "total": 0}
    if state["imported"]:
        ctx.log.info("resuming after %d imported orders", state["imported"])
    while state["imported"] < len(amounts):
        batch = amounts[state["imported"] : state["imported"] + ctx.params["batch_size"]]
        state = {"imported": state["imported"] + len(batch), "total": state["total"] + sum(batch)}
        ctx.checkpoint(state)
        ctx.progress(state["imported"], len(amounts))
    ctx.log.info("imported %d orders worth %d", state["imported"], state["total"])
    return {"orders": state["imported"], "total": state["total"]}
