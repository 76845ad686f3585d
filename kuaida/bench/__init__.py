"""Benchmarks behind `kuaida bench` (latency, load, ...), each measured against transformers and
llama.cpp. Reports are JSON + Markdown (report.py); committed results live in benchmarks/results/."""
