"""Measurements: pure functions returning small dataclasses; formatting lives in report/."""

from compress.measure.flops import MacCount, count_macs
from compress.measure.latency import LatencyPair, measure_latency_pair
from compress.measure.size import ParamCount, SizeReport, count_params, model_sizes

__all__ = ["LatencyPair", "MacCount", "ParamCount", "SizeReport", "count_macs", "count_params",
           "measure_latency_pair", "model_sizes"]
