"""Our own GPU kernels (Triton); each has a plain torch path for the CPU and a self-check."""
