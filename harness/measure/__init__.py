"""Measurement: the run's counts, step times, contention and peak RSS (runstats), live-tensor memory by category
(memory), model FLOPs and MFU (flops), this machine's identity, dtype speeds and peak matmul rate (hardware),
analytic peak memory at scale (estimate) and quantization error per layer (quanterror)."""
