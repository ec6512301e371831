"""deploy/docker-compose.yml, the Prometheus config and rules, and the Grafana dashboard:
they parse, fit together, and ask only for metrics and labels that a live server exports."""
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.promql import exported, selectors

DEPLOY = Path(__file__).parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus/prometheus.yml"
ALERTS = DEPLOY / "prometheus/alerts.yml"
DASHBOARD = DEPLOY / "grafana/dashboards/rfserve.json"
DATASOURCE = DEPLOY / "grafana/provisioning/datasources/prometheus.yml"
PROVIDER = DEPLOY / "grafana/provisioning/dashboards/rfserve.yml"


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    return {r["alert"]: r["expr"] for r in rules}


@pytest.fixture(scope="module")
def scrape(single_node) -> dict[str, set[str]]:
    # A rejected request too, so that the requests counter carries an error status.
    httpx.post(f"{single_node.url}/v1/images/generations", json={"prompt": "x", "size": "7x7"})
    return exported(httpx.get(f"{single_node.url}/metrics").text)


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_rfserve_metric_and_label_is_exported(scrape, source):
    exprs = dashboard_exprs() if source == "dashboard" else list(alert_exprs().values())
    used = [s for e in exprs for s in selectors(e)]
    assert used, f"the {source} queries no rfserve metric"
    for name, labels in used:
        assert name in scrape, f"{source} uses {name}, which the server does not export"
        if scrape[name]:  # label names are known once the series has samples
            assert labels <= scrape[name] | {"instance", "job"}, (name, labels, scrape[name])


def test_dashboard_shows_the_required_panels():
    exprs = "\n".join(dashboard_exprs())
    latency = "sum by (le, model) (rate(rfserve_request_seconds_bucket"
    for needed in ("rate(rfserve_requests_total", f"histogram_quantile(0.5, {latency}",
                   f"histogram_quantile(0.99, {latency}", "rfserve_queue_depth", "rfserve_batch_size_bucket",
                   "DCGM_FI_DEV_FB_USED", 'status=~"4..|5.."'):
        assert needed in exprs, needed


def test_dashboard_uses_the_provisioned_datasource():
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    panels = json.loads(DASHBOARD.read_text())["panels"]
    used = {p["datasource"]["uid"] for p in panels} | {t["datasource"]["uid"] for p in panels for t in p["targets"]}
    assert used == {uid}
    assert len({p["id"] for p in panels}) == len(panels)


def test_compose_wires_server_prometheus_and_grafana_together():
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    gpu = compose["rfserve"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    scraped = {t for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
               for c in job["static_configs"] for t in c["targets"]}
    assert {"rfserve:8000", "dcgm-exporter:9400"} <= scraped and set(compose) >= {"rfserve", "dcgm-exporter"}
    mounted = {v.split(":")[0] for s in compose.values() for v in s.get("volumes", []) if v.startswith("./")}
    assert {"./prometheus/prometheus.yml", "./prometheus/alerts.yml", "./grafana/provisioning",
            "./grafana/dashboards"} <= mounted
    assert all((DEPLOY / m).exists() for m in mounted)
    provider_path = yaml.safe_load(PROVIDER.read_text())["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{provider_path}:ro" in compose["grafana"]["volumes"]


@pytest.mark.skipif(not shutil.which("docker-compose"),
                    reason="docker-compose is not installed (apt-get install docker-compose)")
def test_compose_file_validates():
    run = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_checks_config_rules_and_dashboard_queries(tmp_path):
    # Dashboard queries become recording rules, so promtool parses their PromQL too.
    records = [{"record": f"dashboard:q{i}", "expr": e.replace("$model", ".*")}
               for i, e in enumerate(dashboard_exprs())]
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    for args in (["check", "config", str(PROMETHEUS)], ["check", "rules", str(tmp_path / "dashboard.yml")],
                 ["test", "rules", str(Path(__file__).with_name("alerts_test.yml"))]):
        run = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
