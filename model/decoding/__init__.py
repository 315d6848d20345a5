"""Choosing tokens: logits processors, seeded sampling, beam search, each request's decoder, and the batched token choice of a step."""
