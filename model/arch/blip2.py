"""BLIP-2 (Li et al., 2023): a frozen image encoder and a frozen LLM bridged by a Q-Former.

    pixels --ViT-g--> patch features --Q-Former(32 learned queries)--> 32 query outputs
           --language_projection--> 32 "soft prompt" embeddings --OPT--> text

The image stage is `encode_images`; it runs once per image and its output is reused for every prompt,
beam and sample about that image. The language stage is `prefill` (whole prompts, written into cache
slots) and `decode` (one token per running sequence).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..checkpoint.config import Blip2Config, T5Config
from ..runtime.device import device_index, to_device
from .family import DECODE_ATTENTION, Capabilities
from .kv_cache import AttnBatch, KVCache
from .opt import OPTForCausalLM
from .t5 import KEEP_IN_FP32 as T5_KEEP_IN_FP32
from .t5 import T5Cache, T5ForConditionalGeneration
from .vision import QFormerModel, VisionModel

# One request's prefill input: its image's query embeddings [num_query_tokens, hidden] and prompt ids.
PromptInput = tuple[torch.Tensor, list[int]]


QFORMER_PRECISIONS = ("float32", "tf32", "model", "auto")
# Parameters a float16 BLIP-2 keeps in float32 (transformers' `_keep_in_fp32_modules`: the Q-Former and
# the learned queries; `model.checkpoint.loader.keep_in_float32`).
QFORMER_KEEP_IN_FP32 = (r"qformer\..+", r"query_tokens")


@contextmanager
def tf32_matmuls(on: bool) -> Iterator[None]:
    """fp32 matrix products in TF32 inside the block (a host-side switch read when kernels are chosen,
    so a CUDA graph captured inside keeps it)."""
    if not on:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class Blip2ForConditionalGeneration(nn.Module):
    """A `GenerationModel` (`model.arch.family`); with OPT a `StaticPrefillModel` too."""

    def __init__(self, cfg: Blip2Config, decode_attention: str = "sdpa"):
        """`decode_attention`: "sdpa" (PyTorch's masked attention) or "triton" (OPT's decode kernels,
        `model.kernels.backend.choose_decode_attention` picks it once they pass their self-checks)."""
        super().__init__()
        if decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode_attention must be one of {DECODE_ATTENTION}, got {decode_attention!r}")
        self.cfg = cfg
        self.vision_model = VisionModel(cfg.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer.hidden_size))
        self.qformer = QFormerModel(cfg.qformer)
        self.language_projection = nn.Linear(cfg.qformer.hidden_size, cfg.text_hidden)
        t5 = isinstance(cfg.text, T5Config)
        if t5 and decode_attention != "sdpa":
            raise ValueError("decode_attention 'triton' is for OPT language models, not Flan-T5")
        self.capabilities = Capabilities(generates=True, static_prefill=not t5, decode_kernels=not t5)
        self.decode_attention = decode_attention
        if t5:
            self.language_model = T5ForConditionalGeneration(cfg.text)
        else:
            self.language_model = OPTForCausalLM(cfg.text, decode_kernel=decode_attention == "triton")
        self.keep_in_fp32 = QFORMER_KEEP_IN_FP32 + tuple(
            rf"language_model\.{p}" for p in (T5_KEEP_IN_FP32 if t5 else ())
        )
        self.qformer_tf32 = False  # see `set_qformer_precision`

    def set_qformer_precision(self, precision: str) -> None:
        """The Q-Former's arithmetic: "auto" (transformers' choice, as loaded: float32 in a float16 model,
        by its `_keep_in_fp32_modules`, else the model dtype), "float32", "tf32" (fp32 weights, matrix
        products on the tensor cores' TF32 mode; CUDA only, fp32 elsewhere) or "model" (weights and
        activations in the language model's dtype). ValueError for any other value."""
        if precision not in QFORMER_PRECISIONS:
            raise ValueError(f"Q-Former precision must be one of {QFORMER_PRECISIONS}, got {precision!r}")
        if precision == "auto":
            precision = "float32" if self.lm_dtype == torch.float16 else "model"
        dtype = self.lm_dtype if precision == "model" else torch.float32
        self.qformer.to(dtype)
        self.query_tokens.data = self.query_tokens.data.to(dtype)
        self.qformer_tf32 = precision == "tf32"

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.language_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def new_cache(self, num_slots: int, max_len: int) -> KVCache | T5Cache:
        """The language model's cache for `num_slots` sequences of up to `max_len` positions."""
        device = self.query_tokens.device
        if isinstance(self.language_model, T5ForConditionalGeneration):
            # The decoder's own positions (start token + answer) and the encoder's (queries + prompt).
            return self.language_model.new_cache(num_slots, max_len, max_len, self.lm_dtype, device)
        return self.language_model.new_cache(num_slots, max_len, self.lm_dtype, device)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> query embeddings [B, num_query_tokens, text hidden size].

        As in `transformers`, the Q-Former and the learned queries stay in fp32 in a float16 model (its
        `_keep_in_fp32_modules`) unless `set_qformer_precision` says otherwise; the projection runs in the
        model dtype.
        """
        image = self.vision_model(pixel_values)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        with tf32_matmuls(self.qformer_tf32):
            out = self.qformer(queries, image.to(self.query_tokens.dtype))
        return self.language_projection(out.to(self.language_projection.weight.dtype))

    def prompt_inputs(self, query_embeds: torch.Tensor, text_ids: Sequence[int]) -> PromptInput:
        """One request's prefill input: its image's query embeddings and its prompt's token ids."""
        nq = self.cfg.num_query_tokens
        if query_embeds.shape != (nq, self.cfg.text_hidden):
            raise ValueError(
                f"query_embeds must be [{nq}, {self.cfg.text_hidden}], got {tuple(query_embeds.shape)}"
            )
        return query_embeds, list(text_ids)

    def batch_embeddings(self, inputs: Sequence[PromptInput]) -> tuple[torch.Tensor, list[int]]:
        """The language model's inputs of many requests, right-padded: [B, longest, hidden], and each
        request's length (`num_query_tokens` + its prompt).

        The checkpoint's input ids are `num_query_tokens` `<image>` placeholders followed by the prompt
        (which starts with BOS). `transformers` embeds the placeholders and then overwrites them with the
        query embeddings (`masked_scatter`); here the query embeddings simply take those positions.
        They are already in the decoder's hidden space, so only the text goes through `project_in`:
        every request's text in one embedding call, placed with one indexed copy.
        """
        nq = self.cfg.num_query_tokens
        texts = [text for _, text in inputs]
        lengths = [nq + len(t) for t in texts]
        where = [[i for t in texts for i in t], [r for r, t in enumerate(texts) for _ in t]]
        where.append([nq + j for t in texts for j in range(len(t))])
        ids, rows, cols = to_device(torch.tensor(where, dtype=torch.long), inputs[0][0].device)
        text = self.language_model.token_embeddings(ids)
        padded = text.new_zeros(len(inputs), max(lengths), text.shape[-1])
        padded[:, :nq] = torch.stack([q for q, _ in inputs]).to(text.dtype)
        padded[rows, cols] = text
        return padded, lengths

    def prompt_embeddings(self, query_embeds: torch.Tensor, text_ids: Sequence[int]) -> torch.Tensor:
        """One request's language-model input: [num_query_tokens + len(text_ids), hidden]."""
        padded, _ = self.batch_embeddings([self.prompt_inputs(query_embeds, text_ids)])
        return padded[0]

    def prefill(
        self, inputs: Sequence[PromptInput], slots: torch.Tensor, cache: KVCache | T5Cache
    ) -> torch.Tensor:
        """Run whole prompts into `slots`; return next-token logits [n, vocab]."""
        padded, lengths = self.batch_embeddings(inputs)
        if isinstance(cache, T5Cache):
            return self._prefill_encoder_decoder(padded, lengths, slots, cache)
        # Right padding: under a causal mask no real token sees a pad, so rows stay independent, and the
        # pad positions written to the cache are masked out and overwritten by later decode steps.
        hidden = self.language_model(padded, AttnBatch.prefill(slots, padded.shape[1]), cache)
        last = device_index([n - 1 for n in lengths], hidden.device)
        return self.language_model.logits(hidden[torch.arange(len(inputs), device=hidden.device), last])

    def prefill_static(
        self,
        ids: torch.Tensor,
        queries: torch.Tensor,
        last: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache,
    ) -> torch.Tensor:
        """`prefill` at fixed shapes with every input on the device, as a CUDA graph captures it
        (`model.runtime.static_prefill`): ids [R, T] (the first `num_query_tokens` positions, the `<image>`
        placeholders, may hold any id: the query embeddings [R, nq, hidden] take those positions), each
        row's last prompt position `last` [R] and its cache slot `slots` [R]. Logits [R, vocab] fp32."""
        nq = self.cfg.num_query_tokens
        if ids.dim() != 2 or queries.shape[:2] != (ids.shape[0], nq):
            raise ValueError(
                f"ids must be [rows, positions] and queries [rows, {nq}, hidden], got {tuple(ids.shape)} "
                f"and {tuple(queries.shape)}"
            )
        text = self.language_model.token_embeddings(ids[:, nq:])
        x = torch.cat([queries.to(text.dtype), text], dim=1)
        hidden = self.language_model(x, AttnBatch.prefill(slots, ids.shape[1]), cache)
        rows = torch.arange(ids.shape[0], device=ids.device)
        return self.language_model.logits(hidden[rows, last])

    def _prefill_encoder_decoder(
        self, padded: torch.Tensor, lengths: list[int], slots: torch.Tensor, cache: T5Cache
    ) -> torch.Tensor:
        """Flan-T5: encode the prompts (padding masked), cache each decoder layer's cross-attention
        keys/values in the rows' slots, then run the decoder's start token (position 0)."""
        lm = self.language_model
        lengths = device_index(lengths, slots.device)
        lm.fill_cross(lm.encode(padded, lengths), lengths, slots, cache)
        start = torch.full_like(slots, lm.cfg.decoder_start_token_id)
        return lm.decode(start, torch.zeros_like(slots), slots, cache, 1)

    def rows_logits(self, tokens: torch.Tensor, batch: AttnBatch, cache: KVCache | T5Cache) -> torch.Tensor:
        """Logits [N, T, vocab] (fp32) of token rows over a cached prefix (`model.runtime.scoring`)."""
        lm = self.language_model
        if isinstance(lm, T5ForConditionalGeneration):
            return lm.decode_tokens(tokens, batch, cache)
        return lm.logits(lm(lm.token_embeddings(tokens), batch, cache))

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: KVCache | T5Cache,
        kv_len: int,
        dense: bool = False,
    ) -> torch.Tensor:
        """One new token per row at its own position; return next-token logits [B, vocab].
        `dense`: row r reads cache slot r in place and writes to `slots[r]` (see `model.runtime.static_decode`)."""
        if isinstance(cache, T5Cache):
            return self.language_model.decode(tokens, positions, slots, cache, kv_len, dense)
        x = self.language_model.token_embeddings(tokens[:, None])
        kernel = self.language_model.decode_kernel
        hidden = self.language_model(x, AttnBatch.decode(slots, positions, kv_len, dense, kernel), cache)
        return self.language_model.logits(hidden[:, 0])
