"""Running steps on a device: the step plan, the runner, fixed-shape (CUDA graph) decode, prefill and vision, the background vision worker, int8 weights, host-to-device helpers."""
