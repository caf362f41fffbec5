"""The monitoring files (deploy/prometheus, deploy/grafana): promtool checks the rules and runs their
unit tests on synthetic series; every metric they and the dashboard name is one the service exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import REPO

PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "lesion-dashboard.json"


@pytest.fixture(scope="module")
def promtool() -> str:
    """Debian's prometheus package ships it (.ci/run installs it); under CI its absence fails."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is missing: apt-get install prometheus")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def run(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=PROMETHEUS, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_promtool_checks_the_rules(promtool):
    assert "SUCCESS: 12 rules found" in run(promtool, "check", "rules", "alerts.yml")


def test_each_alert_fires_on_series_that_must_fire_it_and_not_on_the_others(promtool):
    assert "SUCCESS" in run(promtool, "test", "rules", "alerts_test.yml")
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    alerts = {
        r["alert"]
        for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert alerts - tested <= {"LesionApiSlowPredictions"}, (
        alerts - tested
    )  # latency: a histogram_quantile of the rules


def test_the_dashboards_queries_parse(promtool, tmp_path):
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:q{i}", "expr": e} for i, e in enumerate(dashboard_exprs())],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    assert "SUCCESS" in run(promtool, "check", "rules", str(path))


def exported_series() -> set[str]:
    """Every series name the service's registry can export (counters' _total, histograms' parts)."""
    from service.api.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def test_every_metric_the_rules_and_dashboard_read_is_exported():
    named = {m for e in rule_exprs() + dashboard_exprs() for m in re.findall(r"\b(lesion_[a-z_]+)", e)}
    assert named and named <= exported_series(), named - exported_series()


def test_the_service_monitor_selects_the_service_and_its_port():
    monitor = yaml.safe_load((PROMETHEUS / "servicemonitor.yaml").read_text())
    service = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "service.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    pod = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"


def test_metrics_take_the_api_key_as_a_bearer_token(app_factory, tiny_run):
    client = app_factory(tiny_run / "bundle", api_key="s3cret")
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Basic s3cret"}).status_code == 401


def test_the_rule_tests_load_these_rules_and_name_every_alert():
    """Without promtool too (a developer's machine skips the promtool tests): alerts_test.yml tests
    alerts.yml, and names each of its alerts but the latency one."""
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    tested = {a["alertname"] for t in tests["tests"] for a in t.get("alert_rule_test", [])}
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert len(alerts) >= 7 and alerts - tested <= {"LesionApiSlowPredictions"}, alerts - tested
