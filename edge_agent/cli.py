"""``edge-agent``: inspect images, benchmark, generate the synthetic line, run the demo,
run the service, check its config, show its drift and telemetry status."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent import __version__
from edge_agent.protocol.errors import BundleError

if TYPE_CHECKING:  # the heavy modules load only for the command that needs them
    from edge_agent.core.synthetic import LineConditions
    from edge_agent.inspect import Inspector

DEFAULT_MODEL = Path("models/reference-onnx")
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad command-line input: printed as ``edge-agent: error: ...``, exit 2."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from edge_agent.config import ConfigError
    from edge_agent.runtimes.base import ModelLoadError

    try:
        code: int = args.func(args)
    except (UsageError, BundleError, ModelLoadError, ConfigError) as e:
        print(f"edge-agent: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="Edge inspection agent: runs a defect model on camera frames, on the device.",
    )
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    infer = sub.add_parser(
        "infer",
        help="inspect image files and print a verdict for each",
        description="Inspect image files. Bad images get an 'error' verdict with the reason; "
        "the others are still inspected and the exit code stays 0. Exit 2 on bad usage "
        "or a bad bundle.",
    )
    _model_args(infer)
    infer.add_argument("--json", action="store_true", help="one JSON object per line")
    infer.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG/PNG/BMP/WebP)")
    infer.set_defaults(func=_cmd_infer)

    bench = sub.add_parser(
        "bench",
        help="measure the agent's path against raw runtime and a naive loop",
        description="Measure side by side in one run and print the ratios: raw runtime vs "
        "the agent's pipeline on in-memory frames, a naive sequential JPEG loop vs the "
        "agent's pipeline on 1280x960 JPEGs, per-frame overhead, RSS and cold start.",
    )
    _model_args(bench)
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--frames", type=_positive, default=2000, help="in-memory frames per round")
    bench.add_argument("--jpegs", type=_positive, default=600, help="JPEG frames per round")
    bench.add_argument("--rounds", type=_positive, default=3, help="alternating rounds (best kept)")
    bench.add_argument(
        "--decode-workers", type=_positive, default=2, help="decode threads in the JPEG pipeline"
    )
    bench.set_defaults(func=_cmd_bench)

    synth = sub.add_parser(
        "synth",
        help="write synthetic product images and labels.csv",
        description="Render the synthetic line to image files plus DIR/labels.csv "
        "(columns file,label; label is ok or defect). Same seed, same images.",
    )
    synth.add_argument("--out", type=Path, required=True, metavar="DIR")
    synth.add_argument("--count", type=_positive, required=True, metavar="N")
    synth.add_argument("--seed", type=int, default=0, metavar="S")
    _line_args(synth)
    synth.add_argument("--size", type=_size, default=(640, 480), metavar="WxH")
    synth.add_argument("--format", choices=("png", "jpg"), default="png")
    synth.set_defaults(func=_cmd_synth)

    selftest = sub.add_parser(
        "selftest",
        help="run a bundle's golden samples",
        description="Load a bundle, verify its files, and check that each golden sample "
        "gives its expected P(defect). Exit 1 if any sample is off.",
    )
    _model_args(selftest)
    selftest.set_defaults(func=_cmd_selftest)

    demo = sub.add_parser(
        "demo",
        help="run the synthetic line through the model and print verdicts",
        description="Feed the synthetic line through the overlapped pipeline, print fail "
        "and uncertain verdicts, a summary every second, and the local drift check's "
        "verdict on every window (try --brightness 0.8). Ctrl-C stops cleanly.",
    )
    _model_args(demo)
    demo.add_argument("--seconds", type=float, default=15.0, help="how long to run (0: forever)")
    demo.add_argument("--fps", type=float, default=30.0, help="line speed (0: as fast as possible)")
    demo.add_argument("--seed", type=int, default=1, metavar="S")
    demo.add_argument("--size", type=_size, default=(640, 480), metavar="WxH")
    demo.add_argument(
        "--check-frames",
        type=_window_frames,
        default=100,
        metavar="N",
        help="frames per local drift-check window (>= 50; default 100)",
    )
    _line_args(demo)
    demo.set_defaults(func=_cmd_demo)

    run = sub.add_parser(
        "run",
        help="run the agent service in the foreground",
        description="Run the inspection service from a config file: source -> model -> "
        "results.db and evidence. Logs one structured line per event (JSON when not on a "
        "terminal) and a summary line every [log] summary_interval_s. SIGTERM drains "
        "in-flight frames and stops.",
    )
    _config_arg(run)
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser(
        "check",
        help="validate config, profile, bundle and source; print what would run",
        description="Validate the config file, the firmware profile, the model bundle "
        "(including its golden samples) and the source, and print what would run, or every "
        "problem found. Exit 0 when everything is usable, 1 when problems were found, 2 "
        "when the config itself cannot be read.",
    )
    _config_arg(check)
    check.set_defaults(func=_cmd_check)

    status = sub.add_parser(
        "status",
        help="print the local drift alarm and the telemetry spool",
        description="Read the agent's state directory (from the config) and print the "
        "local drift alarm (drift.json: which features drift, by which test, how much) "
        "and the telemetry spool (windows waiting for the broker, windows dropped from a "
        "full spool). Works while the agent runs, and on a line with no broker.",
    )
    _config_arg(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_cmd_status)
    return p


def _config_arg(p: argparse.ArgumentParser) -> None:
    default = os.environ.get("EDGE_AGENT_CONFIG", "/etc/edge-agent/agent.toml")
    p.add_argument(
        "--config",
        type=Path,
        default=Path(default),
        metavar="FILE",
        help=f"agent config (default: $EDGE_AGENT_CONFIG or {default})",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        metavar="BUNDLE",
        help=f"model bundle directory (default: {DEFAULT_MODEL})",
    )
    p.add_argument("--threads", type=_positive, default=1, help="runtime intra-op threads")


def _line_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--brightness", type=float, default=1.0, help="lighting multiplier (1.0)")
    p.add_argument("--defect-rate", type=float, default=0.1, help="share of defective items")
    p.add_argument("--variant", default="a", help="product variant (a: the trained one)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise argparse.ArgumentTypeError(f"size must be WxH, e.g. 640x480, got {text!r}")
    return int(w), int(h)


def _window_frames(text: str) -> int:
    if not text.isdigit() or int(text) < 50:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 50 (the smallest window of frames), got {text!r}"
        )
    return int(text)


def _open_inspector(args: argparse.Namespace) -> Inspector:
    from edge_agent.inspect import Inspector
    from edge_agent.runtimes import RuntimeOptions

    return Inspector.open(args.model, RuntimeOptions(threads=args.threads))


def _cmd_infer(args: argparse.Namespace) -> int:
    inspector = _open_inspector(args)
    out = sys.stdout
    for i, path in enumerate(args.images):
        v = inspector.inspect_path(path, frame_id=i)
        if args.json:
            record: dict[str, object] = {
                "path": path,
                "label": v.label or None,
                "p_defect": None if math.isnan(v.p_defect) else round(v.p_defect, 6),
                "verdict": v.outcome.value,
                "latency_ms": round(v.latency_ms, 3),
            }
            if v.error is not None:
                record["error"] = v.error
            out.write(json.dumps(record) + "\n")
        else:
            p = "-" if math.isnan(v.p_defect) else f"{v.p_defect:.3f}"
            tail = f"  ({v.error})" if v.error else ""
            out.write(f"{v.outcome.value:9s} p={p:5s} {v.latency_ms:7.2f} ms  {path}{tail}\n")
        out.flush()
    inspector.close()
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    inspector = _open_inspector(args)
    results = inspector.self_test()
    if not results:
        print(f"{inspector.manifest.id}: no golden samples in bundle")
        return 1
    for r in results:
        mark = "ok  " if r.ok else "FAIL"
        print(f"{mark} {r.file}: expected {r.expected:.4f}, got {r.got:.4f}")
    bad = sum(not r.ok for r in results)
    print(
        f"{inspector.manifest.id} on {inspector.runtime.name}/{inspector.runtime.provider}: "
        f"{len(results) - bad}/{len(results)} golden samples match"
    )
    return 1 if bad else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.bench import goal_checks, run_bench

    progress = None if args.json else (lambda msg: print(f"... {msg}", file=sys.stderr))
    result = run_bench(
        args.model,
        threads=args.threads,
        frames=args.frames,
        jpeg_count=args.jpegs,
        rounds=args.rounds,
        decode_workers=args.decode_workers,
        progress=progress,
    )
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    r = result
    print(f"model {args.model} on {r.runtime} ({r.provider}), {r.threads} thread(s)")
    print(f"  raw runtime          {r.raw_fps:9.1f} frames/s")
    print(f"  pipeline, in memory  {r.pipeline_fps:9.1f} frames/s   ratio {r.pipeline_ratio:.3f}")
    print(f"  naive JPEG loop      {r.jpeg_naive_fps:9.1f} frames/s")
    print(f"  pipeline, JPEG       {r.jpeg_fps:9.1f} frames/s   ratio {r.jpeg_ratio:.3f}")
    print(f"  preprocess {r.preprocess_ms:.3f} ms, inference {r.inference_ms:.3f} ms (CPU/frame)")
    for key, value, op, goal, met in goal_checks(result):
        print(f"  {key:15s} {value:10.3f}  goal {op} {goal:<6g} {'met' if met else 'NOT MET'}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from edge_agent.sources.synthetic import write_synthetic_set

    conditions = _conditions(args)
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] > 1.0:
            last[0] = now
            print(f"\r{done}/{total} images", end="\n" if done == total else "", file=sys.stderr)

    labels = write_synthetic_set(
        args.out,
        count=args.count,
        seed=args.seed,
        size=args.size,
        conditions=conditions,
        image_format=args.format,
        progress=progress,
    )
    print(f"wrote {args.count} images and {labels}")
    return 0


def _conditions(args: argparse.Namespace) -> LineConditions:
    from edge_agent.core.synthetic import LineConditions, render_item

    try:
        conditions = LineConditions(
            brightness=args.brightness, defect_rate=args.defect_rate, variant=args.variant
        )
        render_item(0, 0, (64, 48), conditions)  # validates every field
    except ValueError as e:
        raise UsageError(str(e)) from e
    return conditions


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.demo import run_demo

    return run_demo(
        _open_inspector(args),
        _conditions(args),
        seed=args.seed,
        size=args.size,
        fps=args.fps,
        seconds=args.seconds,
        check_frames=args.check_frames,
        out=sys.stdout,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.config import load_config, load_profile
    from edge_agent.logs import setup_logging
    from edge_agent.service import Agent

    cfg = load_config(args.config)
    profile = load_profile(cfg.device.profile)
    setup_logging(cfg.log.format, cfg.log.level)
    agent = Agent(cfg, profile)
    agent.install_signal_handlers()
    return agent.run()


def _cmd_check(args: argparse.Namespace) -> int:
    from edge_agent.checks import check_config

    report = check_config(args.config)
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    if report.problems:
        print(f"{len(report.problems)} problem(s) found in {args.config}")
        return 1
    print(f"{args.config}: ok")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from edge_agent.config import load_config
    from edge_agent.telemetry.alarm import read_drift_file
    from edge_agent.telemetry.device import drift_path, spool_dir
    from edge_agent.telemetry.spool import SpoolError, read_counts

    cfg = load_config(args.config)
    state_dir = cfg.storage.state_dir
    try:
        drift = read_drift_file(drift_path(state_dir))
        counts = read_counts(spool_dir(state_dir))
    except (ValueError, SpoolError, OSError) as e:
        raise UsageError(f"state in {state_dir}: {e}") from e
    spool = None
    if counts is not None:
        spool = {
            "queued": counts.queued,
            "dropped": counts.dropped,
            "bytes": counts.bytes,
            "next_seq": counts.next_seq,
        }
    if args.json:
        print(json.dumps({"device": cfg.device.id, "drift": drift, "spool": spool}))
        return 0
    print(f"device      {cfg.device.id}")
    print(f"drift       {_describe_drift(drift)}")
    if spool is None:
        print("spool       none (no broker, or telemetry not started yet)")
    else:
        print(
            f"spool       {spool['queued']} window(s) waiting ({spool['bytes'] // 1024} KiB), "
            f"{spool['dropped']} dropped from a full spool, next seq {spool['next_seq']}"
        )
    return 0


def _describe_drift(drift: dict[str, object] | None) -> str:
    if drift is None:
        return "no state yet (the agent has not run with telemetry enabled)"
    head = f"model {drift.get('model')}, last window {drift.get('last_window')}"
    alarms = drift.get("alarms")
    if not drift.get("drifting") or not isinstance(alarms, list):
        return f"none ({head})"
    parts = []
    for alarm in alarms:
        if isinstance(alarm, dict):
            direction = f" {alarm['direction']}" if alarm.get("direction") else ""
            parts.append(
                f"{alarm.get('feature')} ({alarm.get('test')}{direction}, effect "
                f"{alarm.get('effect')}, since window {alarm.get('since_seq')})"
            )
    return f"DRIFTING: {'; '.join(parts)} ({head})"


if __name__ == "__main__":
    sys.exit(main())
