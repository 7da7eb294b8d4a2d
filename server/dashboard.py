"""Builds ``server/grafana-dashboard.json`` from the metric names in :mod:`valueprobe.server.metrics`.

Run ``python -m valueprobe.server.dashboard`` after changing metrics; a test checks that every expression in the
shipped JSON names only metrics the sidecar exports.
"""

from __future__ import annotations

import json
from pathlib import Path

W = "$__rate_interval"
PANELS = [
    ("Confidence by decision (p50 / p10)", "timeseries", [
        ('histogram_quantile(0.5, sum by (le, decision) (rate(valueprobe_confidence_bucket[%s])))' % W, "p50 {{decision}}"),
        ('histogram_quantile(0.1, sum by (le, decision) (rate(valueprobe_confidence_bucket[%s])))' % W, "p10 {{decision}}"),
    ]),
    ("Confidence distribution", "heatmap", [
        ('sum by (le) (increase(valueprobe_confidence_bucket[%s]))' % W, "{{le}}"),
    ]),
    ("Decisions per second", "timeseries", [
        ('sum by (decision) (rate(valueprobe_decisions_total[%s]))' % W, "{{decision}}"),
    ]),
    ("Escalations (ok / failed)", "timeseries", [
        ('sum by (result) (rate(valueprobe_escalations_total[%s]))' % W, "{{result}}"),
    ]),
    ("Reliability: observed accuracy per confidence bin (1h)", "barchart", [
        ('sum by (bin) (increase(valueprobe_feedback_total{outcome="correct"}[1h])) / sum by (bin) (increase(valueprobe_feedback_total[1h]))', "{{bin}}"),
    ]),
    ("ECE and Brier from feedback, all replicas (1h)", "timeseries", [
        ('sum(abs(sum by (bin) (increase(valueprobe_feedback_total{outcome="correct"}[1h])) - sum by (bin) (increase(valueprobe_feedback_confidence_total[1h])))) / sum(increase(valueprobe_feedback_total[1h]))', "ECE"),
        ('sum(increase(valueprobe_feedback_brier_sum[1h])) / sum(increase(valueprobe_feedback_brier_count[1h]))', "Brier"),
    ]),
    ("Windowed ECE / Brier per replica", "timeseries", [
        ("valueprobe_feedback_window_ece", "ECE {{instance}}"),
        ("valueprobe_feedback_window_brier", "Brier {{instance}}"),
    ]),
    ("Probe readout latency (p50 / p99)", "timeseries", [
        ('histogram_quantile(0.5, sum by (le) (rate(valueprobe_probe_latency_seconds_bucket[%s])))' % W, "p50"),
        ('histogram_quantile(0.99, sum by (le) (rate(valueprobe_probe_latency_seconds_bucket[%s])))' % W, "p99"),
    ]),
    ("Prefill scoring latency (p50 / p99)", "timeseries", [
        ('histogram_quantile(0.5, sum by (le) (rate(valueprobe_prefill_duration_seconds_bucket[%s])))' % W, "p50"),
        ('histogram_quantile(0.99, sum by (le) (rate(valueprobe_prefill_duration_seconds_bucket[%s])))' % W, "p99"),
    ]),
    ("Upstream latency p99 and errors", "timeseries", [
        ('histogram_quantile(0.99, sum by (le, upstream) (rate(valueprobe_upstream_request_duration_seconds_bucket[%s])))' % W, "p99 {{upstream}}"),
        ('sum by (upstream) (rate(valueprobe_upstream_errors_total[%s]))' % W, "errors/s {{upstream}}"),
    ]),
    ("Queue depth and batch size", "timeseries", [
        ("sum(valueprobe_queue_depth)", "queued"),
        ('sum(rate(valueprobe_batch_size_sum[%s])) / sum(rate(valueprobe_batch_size_count[%s]))' % (W, W),
         "mean scoring batch"),
        ('sum(rate(valueprobe_generation_batch_size_sum[%s])) / sum(rate(valueprobe_generation_batch_size_count[%s]))'
         % (W, W), "mean generation batch"),
        ('sum(rate(valueprobe_search_batch_size_sum[%s])) / sum(rate(valueprobe_search_batch_size_count[%s]))'
         % (W, W), "mean search batch"),
    ]),
    ("Error responses", "timeseries", [
        ('sum by (type) (rate(valueprobe_errors_total[%s]))' % W, "{{type}}"),
    ]),
    ("Out-of-distribution prompts (share flagged)", "timeseries", [
        ('sum by (kind) (rate(valueprobe_ood_total{flagged="true"}[%s])) / sum by (kind) (rate(valueprobe_ood_total[%s]))'
         % (W, W), "{{kind}}"),
    ]),
    ("Calibration: live vs shadow Brier on held-out feedback, and the version served", "timeseries", [
        ("valueprobe_calibration_brier", "{{calibrator}} {{slot}} {{instance}}"),
        ("valueprobe_calibration_version", "version {{instance}}"),
    ]),
    ("Drift: served-score PSI against the test split, and OOD rate (window)", "timeseries", [
        ("valueprobe_score_psi", "PSI {{kind}} {{instance}}"),
        ("valueprobe_ood_rate", "OOD {{kind}} {{instance}}"),
    ]),
    ("Loaded artifacts", "table", [
        ("valueprobe_artifact_info", ""),
    ]),
]


def build() -> dict:
    panels = []
    for i, (title, kind, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "title": title, "type": kind, "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend} for j, (expr, legend) in enumerate(targets)],
        })
    return {
        "title": "valueprobe: confidence", "uid": "valueprobe", "schemaVersion": 39, "version": 1, "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
        "panels": panels,
    }


def main():
    path = Path(__file__).with_name("grafana-dashboard.json")
    path.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
