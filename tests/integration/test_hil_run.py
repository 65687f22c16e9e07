"""``hil/run.py all --quick --json`` as a real process: every scenario runs once against a
real agent, Mosquitto, ffmpeg stream, tmpfs and network namespace (about 75 s on two
cores), and each test reads its scenario's result. The run goes through the ssh target:
an OpenSSH server (``/usr/sbin/sshd``, Debian ``openssh-server``) on loopback lets the
harness in, and the "device" runs ``hil.run --target local`` (this machine's agent)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from hil.scenarios import registry
from hil.scenarios.clock_jump import find_libfaketime
from tests.mqtt_broker import free_port

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "hil" / "run.py"
pytestmark = pytest.mark.slow
SSHD = Path("/usr/sbin/sshd")


def run_harness(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUN), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def harness(sshd: tuple[str, list[str]]) -> tuple[int, dict[str, object]]:
    """All scenarios, through the ssh target: the device is this machine behind a loopback
    sshd, which runs ``hil.run --target local --json`` there (so both paths run once)."""
    target, options = sshd
    done = run_harness(
        "all",
        "--quick",
        "--json",
        "--profile",
        "rpi4",
        "--target",
        target,
        "--remote-dir",
        str(ROOT),
        "--remote-python",
        sys.executable,
        *ssh_args(options),
    )
    try:
        document = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON from hil/run.py (exit {done.returncode}):\n{done.stderr[-4000:]}")
    assert isinstance(document, dict)
    assert document["target"] == target
    assert "broker-outage: starting" in done.stderr  # the device's progress comes through
    return done.returncode, document


def ssh_args(options: list[str]) -> list[str]:
    return [arg for option in options for arg in ("--ssh-option", option)]


def scenario(harness: tuple[int, dict[str, object]], name: str) -> dict[str, object]:
    items = cast(list[dict[str, object]], harness[1]["scenarios"])
    found = [item for item in items if item["name"] == name]
    assert len(found) == 1, [item["name"] for item in items]
    return found[0]


def figures(item: dict[str, object]) -> dict[str, object]:
    return cast(dict[str, object], item["figures"])


def test_every_scenario_ran_under_the_profile_limits(
    harness: tuple[int, dict[str, object]],
) -> None:
    code, document = harness
    items = cast(list[dict[str, object]], document["scenarios"])
    assert [item["name"] for item in items] == list(registry())
    assert document["limits"] == {
        "profile": "rpi4",
        "cpus": sorted(os.sched_getaffinity(0))[:2],
        "memory_mb": 4096,
    }
    all_passed = all(item["status"] == "pass" for item in items)
    assert code == (0 if all_passed else 1)


@pytest.mark.parametrize("name", ["broker-outage", "partition"])
def test_no_verdict_lost_and_windows_in_order_through_the_fault(
    harness: tuple[int, dict[str, object]], name: str
) -> None:
    item = scenario(harness, name)
    assert item["status"] == "pass", item["notes"]
    got = figures(item)
    assert got["rows_in_results_db"] == got["frames_produced"]
    assert cast(int, got["windows_spooled_max"]) >= 1
    assert got["windows_out_of_order"] == 0
    assert cast(int, got["windows_missing"]) <= cast(int, got["spool_dropped"])
    assert got["spool_queued_at_end"] == 0


def test_partition_uses_a_namespace_when_root(harness: tuple[int, dict[str, object]]) -> None:
    method = figures(scenario(harness, "partition"))["method"]
    assert method == ("netns+veth" if os.geteuid() == 0 else "broker-stopped (fallback)")


def test_disk_full_loses_nothing_committed(harness: tuple[int, dict[str, object]]) -> None:
    item = scenario(harness, "disk-full")
    got = figures(item)
    assert item["status"] == "pass", item["notes"]
    assert got["integrity"] == "ok"
    assert cast(int, got["rows_final"]) > cast(int, got["rows_at_full"]) >= 200
    # The agent keeps inspecting on a full disk, says so once, and stores again after.
    assert got["alive_while_full"] and got["recovered_after_freeing"]
    assert not got["uncaught_traceback"] and got["exit_status"] == 0
    assert "results_db_failed" in cast(list[str], got["error_events"])


def test_camera_stream_comes_back(harness: tuple[int, dict[str, object]]) -> None:
    item = scenario(harness, "camera-stream")
    assert item["status"] == "pass", item["notes"]
    assert cast(float, figures(item)["seconds_to_resume"]) < 30


def test_power_cut_during_update_never_bricks(harness: tuple[int, dict[str, object]]) -> None:
    item = scenario(harness, "powercut-update")
    assert item["status"] == "pass", item["notes"]
    assert figures(item)["bricked"] == 0 and figures(item)["finished"] == 1


def test_soak_memory_and_descriptors_flat(harness: tuple[int, dict[str, object]]) -> None:
    item = scenario(harness, "soak")
    assert item["status"] == "pass", item["notes"]
    got = figures(item)
    assert cast(float, got["rss_growth_mib"]) <= cast(float, got["rss_tolerance_mib"])
    assert cast(int, got["samples"]) >= 15


def test_clock_jump_keeps_the_floor_and_refuses_when_far_ahead(
    harness: tuple[int, dict[str, object]],
) -> None:
    item = scenario(harness, "clock-jump")
    assert item["status"] == "pass", item["notes"]
    got = figures(item)
    assert got["small_jump_installed"] is True and got["small_jump_floor_kept"] is True
    assert got["large_jump_refusal"] == "refused" and got["large_jump_active"] == "2.0.0"
    assert "expired" in str(got["large_jump_detail"])
    assert find_libfaketime() is not None, "apt-get install faketime"
    # The running agent's wall clock jumped an hour forward and back; it kept inspecting.
    rows = cast(dict[str, int], got["running_clock_rows"])
    assert set(rows) == {"before", "forward", "back"} and min(rows.values()) > 0
    assert cast(int, got["running_clock_max_ahead_s"]) > 1800
    assert got["running_clock_alive"] is True and got["running_clock_exit"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-scenario"], "invalid choice"),
        (["soak", "--target", "ftp://x"], "--target must be local or ssh://"),
        (["soak", "--profile", "no-such-board"], "no firmware profile 'no-such-board'"),
    ],
)
def test_usage_errors_name_the_problem(args: list[str], message: str) -> None:
    done = run_harness(*args)
    assert done.returncode != 0
    assert message in done.stderr


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """An sshd on a free loopback port that lets this user in with a fresh key; yields the
    target URL and the harness's ``--ssh-option`` arguments."""
    tmp_path = tmp_path_factory.mktemp("sshd")
    assert SSHD.exists(), f"{SSHD} not found: apt-get install openssh-server"
    for name in ("host_key", "client_key"):
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)]
        subprocess.run(keygen, check=True)
    (tmp_path / "authorized_keys").write_bytes((tmp_path / "client_key.pub").read_bytes())
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    port = free_port()
    (tmp_path / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {tmp_path / 'host_key'}\n"
        f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nPasswordAuthentication no\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
    )
    proc = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(tmp_path / "sshd_config")],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "sshd.log").open("w"),
    )
    try:
        user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else os.getlogin())
        options = [f"IdentityFile={tmp_path / 'client_key'}"]
        options += [f"UserKnownHostsFile={tmp_path / 'known_hosts'}"]
        options += ["StrictHostKeyChecking=accept-new"]
        deadline = time.monotonic() + 10
        while (tmp_path / "sshd.log").read_text().find("listening") < 0:
            assert proc.poll() is None and time.monotonic() < deadline, (
                tmp_path / "sshd.log"
            ).read_text()
            time.sleep(0.05)
        yield f"ssh://{user}@127.0.0.1:{port}", options
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def test_ssh_target_without_the_project_says_so(sshd: tuple[str, list[str]]) -> None:
    target, options = sshd
    missing = ["--remote-dir", "/nonexistent", *ssh_args(options)]
    done = run_harness("soak", "--target", target, *missing)
    assert done.returncode == 1
    assert "is the project installed in /nonexistent" in done.stderr
