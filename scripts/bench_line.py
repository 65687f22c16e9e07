"""Line benchmarks, each a ratio of two runs measured side by side in one process.

- hot folder vs in-memory: the same JPEG frames through the pipeline, once from memory
  and once as files in a hot folder (read, settle, inspect, move to done/, fsync);
- storage cost: the pipeline on in-memory frames with results.db and evidence writing
  (results committed in batches, evidence on its own thread) vs the pipeline alone.

Usage: scripts/bench_line.py [--model DIR] [--frames N] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from edge_agent.core.frame import Frame
from edge_agent.core.synthetic import LineConditions
from edge_agent.inspect import Inspector
from edge_agent.pipeline import Pipeline
from edge_agent.sinks.evidence import EvidenceStore
from edge_agent.sinks.evidence_writer import EvidenceWriter
from edge_agent.sinks.results_db import ResultRecord, ResultsDB
from edge_agent.sources.folder import FolderSource
from edge_agent.sources.synthetic import jpeg_frames

SIZE = (640, 480)
MB = 1024 * 1024


def _memory_frames(jpegs: list[bytes], n: int) -> Iterator[Frame]:
    for i in range(n):
        yield Frame(i, time.time(), "memory", data=jpegs[i % len(jpegs)])


def run_memory(inspector: Inspector, jpegs: list[bytes], n: int) -> float:
    started = time.perf_counter()
    for _ in Pipeline(inspector).run(_memory_frames(jpegs, n)):
        pass
    return n / (time.perf_counter() - started)


def run_folder(inspector: Inspector, jpegs: list[bytes], n: int, work: Path) -> float:
    inbox = work / "inbox"
    shutil.rmtree(inbox, ignore_errors=True)
    inbox.mkdir(parents=True)
    for i in range(n):
        (inbox / f"{i:06d}.jpg").write_bytes(jpegs[i % len(jpegs)])
    source = FolderSource(inbox, settle_s=0.0, poll_s=0.01, stop_when_empty=True)
    started = time.perf_counter()
    count = 0
    for item in Pipeline(inspector).run(source):
        source.ack(item.frame, item.verdict.outcome.value)
        count += 1
    elapsed = time.perf_counter() - started
    if count != n:
        raise RuntimeError(f"hot folder gave {count} frames, expected {n}")
    return n / elapsed


def run_stored(inspector: Inspector, jpegs: list[bytes], n: int, work: Path) -> float:
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    db = ResultsDB(state / "results.db")
    store = EvidenceStore(
        state / "evidence",
        quota_bytes={"fail": 600 * MB, "uncertain": 300 * MB, "pass": 100 * MB, "error": 0},
    )
    evidence = EvidenceWriter(store)
    model = inspector.manifest.id
    started = time.perf_counter()
    for item in Pipeline(inspector).run(_memory_frames(jpegs, n)):
        v = item.verdict
        path = evidence.submit(item.frame, v.outcome.value)
        db.add(
            ResultRecord(
                frame_id=item.frame.frame_id,
                ts=item.frame.timestamp,
                source=item.frame.source,
                source_key=None,
                model=model,
                p_defect=v.p_defect,
                verdict=v.outcome.value,
                latency_ms=v.latency_ms,
                error=v.error,
                evidence=path,
            )
        )
    db.flush()
    elapsed = time.perf_counter() - started
    evidence.close()
    db.close()
    return n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/reference-onnx"))
    parser.add_argument("--frames", type=int, default=1000, help="frames per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (best kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    def say(message: str) -> None:
        if not args.json:
            print(f"... {message}", file=sys.stderr)

    inspector = Inspector.open(args.model)
    jpegs = jpeg_frames(11, 64, SIZE, LineConditions())
    mem = folder = mem2 = stored = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-line-") as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            say(f"round {r + 1}/{args.rounds}: in memory, hot folder, with storage")
            mem = max(mem, run_memory(inspector, jpegs, args.frames))
            folder = max(folder, run_folder(inspector, jpegs, args.frames, work))
            mem2 = max(mem2, run_memory(inspector, jpegs, args.frames))
            stored = max(stored, run_stored(inspector, jpegs, args.frames, work))
    baseline = max(mem, mem2)
    result = {
        "frames": args.frames,
        "frame_size": f"{SIZE[0]}x{SIZE[1]}",
        "memory_fps": round(baseline, 1),
        "folder_fps": round(folder, 1),
        "folder_ratio": round(folder / baseline, 3),
        "stored_fps": round(stored, 1),
        "storage_ratio": round(stored / baseline, 3),
        "storage_loss_pct": round(100.0 * (1.0 - stored / baseline), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:18s} {value}")
        print("goal: storage_loss_pct <= 5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
