"""The data path as overlapped stages joined by bounded queues.

    source -> [decode + preprocess] x N -> inference -> caller

Decoding and preprocessing run on ``decode_workers`` threads (OpenCV releases the GIL);
inference runs on one thread (ONNX Runtime and LiteRT release the GIL), so on two cores
decoding frame n+1 overlaps inferring frame n. The inference thread does nothing but
run the model; verdicts are made on the caller's thread. Results come out in frame order.

A live source (``drop_oldest=True``) is read on its own feeder thread and never waits
for the pipeline: when the input queue is full, the oldest waiting frame is dropped and
counted. Other sources (files, replay) are read by the decode workers themselves and
wait instead; nothing is dropped.

``swap`` replaces the model while frames flow. Each frame is bound to the inspector that
is current when a decode worker takes it, and keeps it through preprocess, inference and
verdict, so a frame never mixes two models and frames switch over in frame order.
"""

from __future__ import annotations

import queue
import threading
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from edge_agent.core.decode import ImageError
from edge_agent.core.frame import Frame
from edge_agent.core.preprocess import Image, Tensor
from edge_agent.core.verdict import Verdict, error_verdict, judge
from edge_agent.inspect import Inspector

_POLL_S = 0.05
_T = typing.TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Inspection:
    """A frame and its verdict; ``fitted`` is the model-size image (None on error).

    ``inspector`` is the one that prepared and judged the frame (after a ``swap``, the
    agent sees here when the new model took effect); ``model`` is its bundle id.
    """

    frame: Frame
    verdict: Verdict
    fitted: Image | None
    inspector: Inspector | None = None

    @property
    def model(self) -> str:
        """``name@version`` of the bundle that produced the verdict ("" if unknown)."""
        return "" if self.inspector is None else self.inspector.manifest.id


@dataclass(slots=True)
class PipelineCounters:
    frames_in: int = 0
    dropped: int = 0
    inspected: int = 0
    errors: int = 0


@dataclass(slots=True)
class _Prepared:
    seq: int
    frame: Frame
    inspector: Inspector
    started: float
    fitted: Image | None = None
    tensor: Tensor | None = None
    error: str | None = None
    outputs: npt.NDArray[np.float32] | None = None
    finished: float = 0.0


@dataclass(slots=True)
class _Done:
    """End-of-stream marker; carries a stage's crash, if any, to the caller."""

    failure: BaseException | None = None
    extra: list[BaseException] = field(default_factory=list)


class Pipeline:
    """Run frames through an inspector with overlapped stages.

    ``run`` may be called once per Pipeline. ``stop`` (from any thread, e.g. a SIGTERM
    handler) stops reading the source; frames already read are still inspected and
    yielded, so nothing taken from the source is lost. ``swap`` (from any thread)
    changes the model for the frames taken from then on.
    """

    def __init__(
        self,
        inspector: Inspector,
        *,
        decode_workers: int = 1,
        queue_size: int = 8,
        drop_oldest: bool = False,
    ) -> None:
        if decode_workers < 1:
            raise ValueError("decode_workers must be >= 1")
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        self.inspector = inspector
        self.decode_workers = decode_workers
        self.drop_oldest = drop_oldest
        self.counters = PipelineCounters()
        self._q_in: queue.Queue[tuple[int, Frame] | _Done] = queue.Queue(queue_size)
        self._q_mid: queue.Queue[_Prepared | _Done] = queue.Queue(queue_size)
        self._q_out: queue.Queue[_Prepared | _Done] = queue.Queue(queue_size * 4)
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._dropped_seqs: set[int] = set()
        self._source_lock = threading.Lock()
        self._take_lock = threading.Lock()
        self._iterator: Iterator[Frame] = iter(())
        self._exhausted = False

    def stop(self) -> None:
        """Stop taking frames from the source; in-flight frames are still finished."""
        self._stop.set()

    def swap(self, inspector: Inspector) -> None:
        """Inspect the frames taken from now on with ``inspector``; callable from any thread.

        Frames already taken finish on the inspector they started with; none is lost,
        failed or repeated, and results stay in frame order. ``inspector`` must be loaded
        and warmed up already (this call does no work, so the line does not stall), and
        must not be used by another thread meanwhile. The old inspector is no longer used
        once an Inspection from the new one has been yielded (or ``run`` has ended); only
        then may the caller close it.
        """
        # No lock here: a frame's seq and inspector are read together under the take
        # locks, in frame order, so the switch falls between two consecutive frames and
        # the model never goes back and forth across workers. Taking a lock would make
        # swap wait for the next frame of an idle source.
        self.inspector = inspector

    def run(self, frames: Iterable[Frame]) -> Iterator[Inspection]:
        """Inspect ``frames``; yield one Inspection per frame read, in frame order."""
        for item in self.run_with_heartbeat(frames, None):
            if item is not None:
                yield item

    def run_with_heartbeat(
        self, frames: Iterable[Frame], heartbeat_s: float | None
    ) -> Iterator[Inspection | None]:
        """Like ``run``, but yield None whenever ``heartbeat_s`` passes without a result,
        so the caller can flush, log and ping a watchdog while the line is idle."""
        if self.drop_oldest:
            # A live source gets its own thread, so that it is read on time (and the
            # oldest waiting frame dropped) however busy the decode workers are.
            feeder = threading.Thread(target=self._feed, args=(frames,), name="feeder", daemon=True)
            threads = [feeder]
            take = self._take_queued
        else:
            # A waiting source is read by the decode workers themselves: one thread and
            # one queue hop fewer per frame.
            self._iterator = iter(frames)
            threads = []
            take = self._take_direct
        threads += [
            threading.Thread(
                target=self._prepare_loop, args=(take,), name=f"decode-{i}", daemon=True
            )
            for i in range(self.decode_workers)
        ]
        threads.append(threading.Thread(target=self._infer_loop, name="inference", daemon=True))
        for t in threads:
            t.start()
        try:
            yield from self._ordered(heartbeat_s)
        finally:
            # Reached on normal end, on a crash, or when the caller stops iterating.
            self._stop.set()
            self._abort.set()
            for t in threads:
                t.join(timeout=5.0)

    # -- stages -------------------------------------------------------------------------

    def _feed(self, frames: Iterable[Frame]) -> None:
        failure: BaseException | None = None
        try:
            for seq, frame in enumerate(frames):
                self.counters.frames_in += 1
                if self.drop_oldest:
                    self._put_dropping_oldest((seq, frame))
                elif not self._put(self._q_in, (seq, frame)):
                    return
                if self._stop.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - carried to the caller's thread, re-raised
            failure = e
        for _ in range(self.decode_workers):
            self._put(self._q_in, _Done(failure))

    def _take_queued(self) -> _Prepared | _Done | None:
        # Frames leave the queue in seq order; binding the inspector in the same critical
        # section keeps that order for the model too.
        with self._take_lock:
            item = self._get(self._q_in)
            if isinstance(item, tuple):
                return _Prepared(item[0], item[1], self.inspector, time.perf_counter())
            return item

    def _take_direct(self) -> _Prepared | _Done | None:
        with self._source_lock:
            if self._stop.is_set() or self._abort.is_set() or self._exhausted:
                return _Done()
            try:
                frame = next(self._iterator)
            except StopIteration:
                self._exhausted = True
                return _Done()
            except BaseException as e:  # noqa: BLE001 - carried to the caller's thread, re-raised
                self._exhausted = True
                return _Done(e)
            seq = self.counters.frames_in
            self.counters.frames_in += 1
            return _Prepared(seq, frame, self.inspector, time.perf_counter())

    def _prepare_loop(self, take: Callable[[], _Prepared | _Done | None]) -> None:
        while True:
            prepared = take()
            if prepared is None:
                return
            if isinstance(prepared, _Done):
                self._put(self._q_mid, prepared)
                return
            frame, inspector = prepared.frame, prepared.inspector
            try:
                image = inspector.decode(frame.data) if frame.data is not None else frame.image
                assert image is not None
                pre = inspector.preprocessor
                prepared.fitted = pre.fit(image)
                prepared.tensor = pre.to_tensor(prepared.fitted)
            except ImageError as e:
                prepared.error = e.reason
            except BaseException as e:  # noqa: BLE001 - carried to the caller's thread, re-raised
                self._put(self._q_mid, _Done(e))
                return
            if not self._put(self._q_mid, prepared):
                return

    def _infer_loop(self) -> None:
        # The bottleneck stage: nothing here but taking a tensor, running the model and
        # passing the outputs on. Verdicts are made on the caller's thread. Each frame runs
        # on the model that prepared it; ``run`` is looked up again only after a swap.
        inspector = self.inspector
        run = inspector.runtime.run
        done = 0
        failures: list[BaseException] = []
        while done < self.decode_workers:
            item = self._get(self._q_mid)
            if item is None:
                return
            if isinstance(item, _Done):
                done += 1
                if item.failure is not None:
                    failures.append(item.failure)
                continue
            if item.tensor is not None:
                if item.inspector is not inspector:
                    inspector = item.inspector
                    run = inspector.runtime.run
                try:
                    item.outputs = run(item.tensor)
                except BaseException as e:  # noqa: BLE001 - carried to the caller's thread, re-raised
                    failures.append(e)
                    break
                item.finished = time.perf_counter()
            if not self._put(self._q_out, item):
                return
        first = failures[0] if failures else None
        self._put(self._q_out, _Done(first, failures[1:]))

    def _inspection(self, item: _Prepared) -> Inspection:
        fid = item.frame.frame_id
        if item.outputs is None:
            verdict = error_verdict(fid, item.error or "unknown error", 0.0)
        else:
            latency = (item.finished - item.started) * 1000.0
            m = item.inspector
            verdict = judge(item.outputs, m.manifest.output, m.decision, fid, latency)
        return Inspection(item.frame, verdict, item.fitted, item.inspector)

    def _ordered(self, heartbeat_s: float | None) -> Iterator[Inspection | None]:
        pending: dict[int, Inspection] = {}
        next_seq = 0
        while True:
            try:
                item = self._q_out.get(timeout=heartbeat_s)
            except queue.Empty:
                yield None
                continue
            if isinstance(item, _Done):
                if item.failure is not None:
                    raise item.failure
                for seq in sorted(pending):
                    yield self._count(pending.pop(seq))
                return
            pending[item.seq] = self._inspection(item)
            while True:
                if next_seq in pending:
                    yield self._count(pending.pop(next_seq))
                elif not self._was_dropped(next_seq):
                    break
                next_seq += 1

    # -- queue helpers ------------------------------------------------------------------

    def _count(self, inspection: Inspection) -> Inspection:
        self.counters.inspected += 1
        if inspection.verdict.error is not None:
            self.counters.errors += 1
        return inspection

    def _put(self, q: queue.Queue[_T], item: _T) -> bool:
        while not self._abort.is_set():
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue[_T]) -> _T | None:
        while not self._abort.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None

    def _put_dropping_oldest(self, item: tuple[int, Frame]) -> None:
        with self._lock:
            while True:
                try:
                    self._q_in.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        oldest = self._q_in.get_nowait()
                    except queue.Empty:
                        continue
                    if isinstance(oldest, tuple):
                        self._dropped_seqs.add(oldest[0])
                        self.counters.dropped += 1

    def _was_dropped(self, seq: int) -> bool:
        with self._lock:
            if seq in self._dropped_seqs:
                self._dropped_seqs.discard(seq)
                return True
            return False
