"""The REST API's routes in process (Starlette's test client, the real model): the token,
the bounds, the evidence rule, a corrupt image, the content type and the size limit."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from edge_agent.inspect import Inspector
from edge_agent.metrics import AgentView
from edge_agent.sinks.api_backend import ApiInspector, ResultsReader
from edge_agent.sinks.rest_api import RestSettings, build_app
from tests.integration.reference import ONNX_BUNDLE
from tests.unit.test_rest_backend import results_db

TOKEN = "s3cret-token-for-the-line"


def test_routes_answer_and_guard(tmp_path: Path, sample_jpeg: bytes) -> None:
    state = tmp_path / "state"
    (state / "evidence" / "fail" / "d").mkdir(parents=True)
    (state / "evidence" / "fail" / "d" / "1.jpg").write_bytes(sample_jpeg)
    results_db(state / "results.db")
    view = AgentView("cam-1", state)
    inspector = ApiInspector(Inspector.open, lambda: ONNX_BUNDLE, view)
    settings = RestSettings("127.0.0.1", 0, TOKEN, max_image_bytes=1 << 20, results_limit=3)
    app = build_app(
        settings, view, inspector, ResultsReader(state / "results.db"), state / "evidence"
    )
    auth = {"authorization": f"Bearer {TOKEN}"}
    try:
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200  # no token needed
            assert client.get("/v1/status").status_code == 401
            assert (
                client.get("/v1/status", headers={"authorization": "Bearer wrong"}).status_code
                == 401
            )
            assert client.get("/v1/status", headers=auth).json()["device"] == "cam-1"
            rows = client.get("/v1/results", params={"limit": 50}, headers=auth).json()
            assert rows["limit"] == 3 and len(rows["results"]) == 3  # bounded by config
            # Starlette's test client calls itself "testclient": not a plant address.
            assert client.get("/v1/evidence/2", headers=auth).status_code == 403
            jpeg = {**auth, "content-type": "image/jpeg"}
            ok = client.post("/v1/inspect", content=sample_jpeg, headers=jpeg).json()
            assert ok["outcome"] in ("pass", "fail", "uncertain") and ok["model"]
            bad = client.post("/v1/inspect", content=b"\x00garbage", headers=jpeg)
            assert bad.status_code == 200 and bad.json()["outcome"] == "error"
            assert bad.json()["error"]
            text = {**auth, "content-type": "text/plain"}
            assert client.post("/v1/inspect", content=b"x", headers=text).status_code == 415
            big = client.post("/v1/inspect", content=b"x" * (2 << 20), headers=jpeg)
            assert big.status_code == 413
            metrics = client.get("/metrics", headers=auth).text
            assert 'edgefleet_agent_api_inspections_total{outcome="error"} 1.0' in metrics
    finally:
        inspector.close()
