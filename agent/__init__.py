"""infersight: eBPF observability for LLM inference."""
