"""Helpers for tests and benchmarks: sample records, child-process launchers, ports and polling.

The top layer: it may import any service and the local stack; no production code imports it.
"""
