"""The networks: ViT and Q-Former, OPT, Flan-T5, BERT (BLIP), the BLIP-2 and BLIP wholes, retrieval heads, and the KV caches they write."""
