"""Hardware-in-the-loop harness: run fault-injection scenarios against a device.

Usage::

    hil/run.py SCENARIO... [--target local|ssh://user@host] [--json] [--quick]
               [--profile NAME] [--cpus N] [--keep DIR]
               [--remote-dir DIR] [--remote-python PATH] [--ssh-option OPTION]...

``SCENARIO`` is a name from ``hil.scenarios.registry()`` or ``all``. ``--target local``
(the default) runs a real ``edge-agent run`` process on this machine under the CPU and
memory limits of the firmware profile (``hil/scenarios/device.py``).
``ssh://user@host[:port]`` runs the same command on the device (``PYTHON -m hil.run ...
--target local --json`` in ``--remote-dir``, where the project must be installed) and
parses its JSON.

Prints one line per scenario (or the full result as JSON with ``--json``); progress goes
to stderr. Exit status 0 when every scenario passed, 1 otherwise (``unavailable`` counts
as not passed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for hil.* and tests.*, when run as a script

from hil.scenarios import registry  # noqa: E402
from hil.scenarios.device import Limits  # noqa: E402
from hil.scenarios.result import Options, Result  # noqa: E402


def run_local(names: list[str], options: Options) -> list[Result]:
    """Run ``names`` one after the other, each in its own subdirectory of ``work``. A
    scenario that cannot run at all is reported as failed with the harness's error."""
    scenarios = registry()
    results = []
    for name in names:
        work = options.work / name
        work.mkdir(parents=True, exist_ok=True)
        scenario_options = Options(
            work, options.profile, options.quick, options.progress, options.cpus
        )
        options.say(name, "starting")
        started = time.monotonic()
        try:
            result = scenarios[name](scenario_options)
        except (RuntimeError, OSError, SystemExit, AssertionError) as e:
            # The harness itself could not run this one (a tool missing, a broker or
            # stream that would not start): report it and go on with the next.
            result = Result(name, "fail", notes=[f"harness error: {type(e).__name__}: {e}"])
        result.seconds = time.monotonic() - started
        options.say(name, f"{result.status} in {result.seconds:.1f} s")
        results.append(result)
    return results


def ssh_command(target: str, options: list[str]) -> list[str]:
    """``ssh`` arguments for ``ssh://user@host[:port]`` plus ``-o OPTION`` each."""
    address = target.removeprefix("ssh://")
    command = ["ssh", "-o", "BatchMode=yes"]
    for option in options:
        command += ["-o", option]
    host, _, port = address.rpartition(":")
    if port.isdigit() and host:
        command += ["-p", port]
        address = host
    return [*command, address]


def run_ssh(
    target: str, argv: list[str], remote_dir: str, remote_python: str, options: list[str]
) -> dict[str, object]:
    """Run this harness on the device with ``--target local --json`` and return its JSON
    document; raises ``SystemExit`` with ssh's exit status when it gives none."""
    remote = " ".join(shlex.quote(a) for a in [remote_python, "-m", "hil.run", *argv])
    command = f"cd {shlex.quote(remote_dir)} && {remote} --target local --json"
    done = subprocess.run(
        [*ssh_command(target, options), command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=None,  # the device's progress lines, as they come
        text=True,
        check=False,
    )
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise SystemExit(
            f"hil: {target} gave no JSON result (ssh exit {done.returncode}); is the project "
            f"installed in {remote_dir} with {remote_python}? stdout: {done.stdout[-500:]!r}"
        ) from e
    if not isinstance(document, dict):
        raise SystemExit(f"hil: {target} gave {type(document).__name__}, not an object")
    return document


def parse(argv: list[str] | None) -> argparse.Namespace:
    names = list(registry())
    parser = argparse.ArgumentParser(
        description="Inject faults into an edge device (broker outage, disk full, clock "
        "jump, camera loss, power cut during update, network partition, soak) and report "
        "pass/fail with figures."
    )
    parser.add_argument("scenarios", nargs="+", choices=[*names, "all"], metavar="SCENARIO")
    parser.add_argument("--target", default="local", help="local or ssh://user@host")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="seconds instead of minutes")
    parser.add_argument("--profile", default="rpi4", help="firmware profile (default rpi4)")
    parser.add_argument("--cpus", type=int, help="CPUs for the agent (default: profile)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument(
        "--remote-dir", default="edgefleet", help="project checkout on an ssh target"
    )
    parser.add_argument(
        "--remote-python",
        default=".venv/bin/python",
        help="interpreter on an ssh target, relative to --remote-dir (default .venv/bin/python)",
    )
    parser.add_argument(
        "--ssh-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="passed to ssh as -o OPTION (repeatable), e.g. IdentityFile=KEY",
    )
    args = parser.parse_args(argv)
    if "all" in args.scenarios:
        args.scenarios = names
    if args.target != "local" and not args.target.startswith("ssh://"):
        parser.error(f"--target must be local or ssh://user@host, not {args.target!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.target.startswith("ssh://"):
        forwarded = [*args.scenarios, "--profile", args.profile]
        forwarded += ["--quick"] if args.quick else []
        forwarded += ["--cpus", str(args.cpus)] if args.cpus is not None else []
        document = run_ssh(
            args.target, forwarded, args.remote_dir, args.remote_python, args.ssh_option
        )
        document["target"] = args.target
    else:
        limits = Limits.of_profile(args.profile, args.cpus)  # fails early on a bad name
        with tempfile.TemporaryDirectory(prefix="hil-") as temporary:
            work = args.keep if args.keep is not None else Path(temporary)
            work.mkdir(parents=True, exist_ok=True)
            options = Options(work, args.profile, args.quick, True, args.cpus)
            results = run_local(args.scenarios, options)
        document = {
            "target": "local",
            "quick": args.quick,
            "limits": limits.to_json(),
            "scenarios": [r.to_json() for r in results],
        }
    scenarios = document.get("scenarios")
    assert isinstance(scenarios, list)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        for item in scenarios:
            print(f"{item['name']:16} {item['status']:11} {json.dumps(item['figures'])}")
            for note in item["notes"]:
                print(f"{'':16} - {note}")
    return 0 if scenarios and all(s["status"] == "pass" for s in scenarios) else 1


if __name__ == "__main__":
    raise SystemExit(main())
