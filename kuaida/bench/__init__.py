"""Benchmarks behind `kuaida bench`: latency (TTFT, decode tok/s, memory, agreement with fp32) against
transformers and llama.cpp. Reports are JSON + Markdown (report.py); results live in benchmarks/results/."""
