"""Metrics: each pool's counters, the signals an app can count with, and the
Prometheus exporter.
"""
