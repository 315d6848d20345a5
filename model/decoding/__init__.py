"""Choosing tokens: logits processors, seeded sampling, beam search, each request's decoding state, and the batched sampler of a step."""
