"""Camera stream dying and coming back: ffmpeg serves a live test pattern over RTSP
(``tests/streaming.py``: RTP/JPEG relayed over RTSP-interleaved TCP), the agent reads it
as ``camera:rtsp://...``, the stream is killed (process and sockets, like a camera losing
power) for a while (60 s, 2 s with ``--quick``) and started again on the same port.

Passes when the agent stays up through the loss, logs the loss and the reconnect, and
inspects again afterwards (results.db grows by at least two seconds of frames).
"""

from __future__ import annotations

import time

from hil.scenarios.device import Limits, LocalAgent, agent_toml, wait_until
from hil.scenarios.result import Options, Result
from tests.integration.agent_proc import inspected
from tests.streaming import FfmpegStreamServer

FPS = 15  # the Raspberry Pi 4 profile's camera rate
SIZE = (320, 240)


def run(options: Options) -> Result:
    result = Result("camera-stream")
    dark_s = 2.0 if options.quick else 60.0
    limits = Limits.of_profile(options.profile, options.cpus)
    state_dir = options.work / "state"
    with FfmpegStreamServer("rtsp", fps=FPS, size=SIZE) as camera:
        source = "\n".join(
            [
                f'url = "camera:{camera.url}"',
                f"width = {SIZE[0]}",
                f"height = {SIZE[1]}",
                f"fps = {FPS}",
            ]
        )
        config = options.work / "agent.toml"
        config.write_text(
            agent_toml(state_dir, profile=options.profile, source=source), encoding="utf-8"
        )
        agent = LocalAgent(config, options.work / "agent.log", limits)
        agent.start()
        try:
            if not result.check(
                wait_until(lambda: inspected(state_dir) >= 2 * FPS, 60),
                f"no frames from {camera.url} (see {agent.log})",
            ):
                return result
            camera.stop()
            lost_at = time.monotonic()
            rows_at_loss = inspected(state_dir)
            options.say(result.name, f"stream killed at {rows_at_loss} rows for {dark_s:g} s")
            time.sleep(dark_s)
            alive_while_dark = agent.running
            rows_back = inspected(state_dir)
            camera.start()
            back_at = time.monotonic()
            resumed = wait_until(
                lambda: inspected(state_dir) >= rows_back + 2 * FPS or not agent.running, 60
            )
            resumed = resumed and agent.running
            resume_s = time.monotonic() - back_at
            options.say(result.name, f"stream back; inspection resumed in {resume_s:.1f} s")
            messages = [str(e.get("msg")) for e in agent.events()]
            lost_logged = any(" lost: " in m for m in messages)
            reconnect_logged = any("reconnected after" in m for m in messages)
            code = agent.stop()
            result.figures.update(
                url_kind="rtsp",
                fps=FPS,
                dark_s=dark_s,
                rows_at_loss=rows_at_loss,
                rows_while_dark=rows_back - rows_at_loss,
                seconds_to_resume=round(resume_s, 2),
                outage_to_resume_s=round(time.monotonic() - lost_at, 2),
                rows_final=inspected(state_dir),
                exit_status=code,
            )
            result.check(alive_while_dark, "the agent exited while the camera was gone")
            result.check(lost_logged, "no log line says the camera was lost")
            result.check(reconnect_logged, "no log line says the camera reconnected")
            result.check(resumed, "inspection did not resume after the stream came back")
            result.check(code == 0, f"the agent exited with {code} on SIGTERM")
        finally:
            agent.stop()
    return result
