"""Deployment and operations: Dockerfile lint, manifests against Kubernetes schemas, real Prometheus,
promtool, the dashboard's queries, the client subcommand and JSON access logs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from live import ROOT, free_port, png_bytes, serve_in_process, serve_in_thread

from server.settings import Settings

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def live(checkpoints):
    with serve_in_thread(
        Settings(model=str(checkpoints("pre_ln")[0]), device="cpu", max_wait_ms=1, engine="thread")
    ) as url:
        httpx.post(url + "/caption", json={"image": __import__("base64").b64encode(png_bytes(1)).decode()})
        yield url


@pytest.mark.slow  # a lint tool (hadolint)
def test_dockerfile_is_hadolint_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "AS cpu" in text and "AS gpu" in text and "HEALTHCHECK" in text and "USER 10001" in text
    assert re.search(r'ENTRYPOINT \["blipserve"', text)  # exec form: SIGTERM reaches the server


@pytest.mark.slow  # a lint tool (kubernetes-validate)
def test_core_manifests_validate_against_kubernetes_schemas():
    import kubernetes_validate

    for name in ("deployment.yaml", "service.yaml", "hpa.yaml"):
        for doc in _docs(K8S / name):
            kubernetes_validate.validate(doc, "1.30", strict=True)


def test_manifests_fit_together():
    (deployment,) = _docs(K8S / "deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    grace = float(container["args"][container["args"].index("--graceful-timeout-s") + 1])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    for name in ("service.yaml", "podmonitor.yaml"):
        (doc,) = _docs(K8S / name)
        selector = doc["spec"]["selector"]
        assert (selector.get("matchLabels") or selector).items() <= labels.items()
    (monitor,) = _docs(K8S / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor" and monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    (scaled,) = _docs(K8S / "keda-scaledobject.yaml")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "blipserve_queue_depth" in scaled["spec"]["triggers"][0]["metadata"]["query"]
    (hpa,) = _docs(K8S / "hpa.yaml")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "blipserve_queue_depth"


def test_dashboard_and_rules_only_use_metrics_we_export(live):
    exported = set(re.findall(r"^(blipserve_\w+)", httpx.get(live + "/metrics").text, re.M))
    dashboard = json.loads((DEPLOY / "grafana/dashboards/blipserve.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [r["expr"] for g in _docs(DEPLOY / "prometheus/alerts.yml")[0]["groups"] for r in g["rules"]]
    used = {m for q in queries for m in re.findall(r"blipserve_\w+", q)}
    assert used and used <= exported, used - exported
    compose = _docs(DEPLOY / "compose/docker-compose.yml")[0]
    assert {"blipserve", "prometheus", "grafana"} <= set(compose["services"])
    for volume in compose["services"]["grafana"]["volumes"] + compose["services"]["prometheus"]["volumes"]:
        assert (DEPLOY / "compose" / volume.split(":")[0]).resolve().exists(), volume


needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool cannot be installed here"
)


def test_the_ready_gauge_is_1_once_the_server_serves(live):
    """`blipserve_ready` (what dashboards and the BlipserveNotReady alert read) with the in-process engine
    too: it stayed 0 with `--engine thread` (only an engine process set it)."""
    assert httpx.get(live + "/ready").status_code == 200
    samples = [line.split() for line in httpx.get(live + "/metrics").text.splitlines()]
    assert ["blipserve_ready", "1.0"] in samples


@pytest.mark.slow  # a lint tool (promtool)
@needs_promtool
def test_promtool_checks_metrics_and_rules(live):
    metrics = httpx.get(live + "/metrics").text
    check = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    rules = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "prometheus/alerts.yml")], capture_output=True, text=True
    )
    assert rules.returncode == 0 and "SUCCESS: 4 rules found" in rules.stdout, rules.stdout + rules.stderr


@pytest.mark.slow  # a real Prometheus scraping the server
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus cannot be installed here")
def test_real_prometheus_scrapes_blipserve(live, tmp_path):
    port = free_port()
    target = live.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus/alerts.yml")],
        "scrape_configs": [{"job_name": "blipserve", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api/v1"
        deadline, value = time.monotonic() + 60, None
        while time.monotonic() < deadline and value is None:
            time.sleep(0.5)
            try:
                result = httpx.get(
                    api + "/query", params={"query": 'blipserve_ready{job="blipserve"}'}
                ).json()
            except httpx.HTTPError:
                continue
            if result.get("data", {}).get("result"):
                value = result["data"]["result"][0]["value"][1]
        assert value == "1"
        total = httpx.get(api + "/query", params={"query": "sum(blipserve_requests_total)"}).json()
        assert float(total["data"]["result"][0]["value"][1]) >= 1
        rules = httpx.get(api + "/rules").json()["data"]["groups"][0]["rules"]
        assert {r["name"] for r in rules} == {
            "BlipserveHighP99Latency",
            "BlipserveQueueSaturated",
            "BlipserveNotReady",
            "BlipserveEngineDown",
        }
    finally:
        proc.terminate()
        proc.wait(30)


def test_client_subcommand_captions_a_folder(live, tmp_path):
    for i in range(3):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(i))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "caption",
        str(tmp_path),
        "--url",
        live,
        "--max-new-tokens",
        "4",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(x["image"]).name for x in lines] == ["bad.png", "img0.png", "img1.png", "img2.png"]
    assert "400" in lines[0]["error"] and all(isinstance(x["text"], str) for x in lines[1:])
    assert result.returncode == 1  # one image failed
    assert "[4/4]" in result.stderr
    # Gibberish captions (tiny models) hold control characters and U+FFFD: printed escaped, never raw.
    assert result.stdout.isascii() and all(c.isprintable() for c in result.stdout.replace("\n", ""))


def test_python_client_vqa(live):
    import asyncio

    from server.client import BlipClient, BlipClientError

    async def go():
        async with BlipClient(live) as client:
            answer = await client.vqa(png_bytes(3), "what is it?", max_new_tokens=3)
            with pytest.raises(BlipClientError, match="422"):
                await client.vqa(png_bytes(3), "q", max_new_tokens=0)
            return answer

    body = asyncio.run(go())
    assert isinstance(body["answer"], str) and body["usage"]["completion_tokens"] >= 1


def test_json_access_logs_carry_the_request_id(checkpoints):
    flags = ["--model", str(checkpoints("pre_ln")[0]), "--device", "cpu", "--log-format", "json"]
    flags += ["--engine", "thread"]  # the access log is the HTTP process's: no engine process needed
    with serve_in_process(*flags) as (url, proc):
        r = httpx.get(url + "/health", headers={"x-request-id": "req-abc-123"})
        assert r.headers["x-request-id"] == "req-abc-123"
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [e for e in entries if e.get("request_id") == "req-abc-123"]
    assert access and access[0]["path"] == "/health" and access[0]["status"] == 200
    assert {"ts", "level", "logger", "message", "duration_ms"} <= set(access[0])
