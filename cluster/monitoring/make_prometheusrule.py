"""Write prometheusrule.yaml from alerts.yml (one source for the alert rules).

    python cluster/monitoring/make_prometheusrule.py

tests/test_cluster.py checks that the committed file equals ``render()``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEADER = """\
# Generated from alerts.yml by make_prometheusrule.py: edit alerts.yml, rerun.
# The saat-dist alert rules for prometheus-operator (kube-prometheus-stack
# loads PrometheusRules whose labels match its ruleSelector).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None  # keep multi-line PromQL readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    rules = yaml.safe_load((HERE / "alerts.yml").read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "saat-dist", "labels": {"release": "prometheus"}},
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


if __name__ == "__main__":
    (HERE / "prometheusrule.yaml").write_text(render())
