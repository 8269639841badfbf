"""Grafana dashboards as code; see :mod:`dashboards.build`."""
