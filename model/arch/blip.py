"""BLIP (Li et al., 2022): a ViT image encoder and a BERT text decoder that cross-attends to it.

    captioning:  pixels --ViT--> image features (CLS + patches) ----cross-attention----+
                 [DEC] (+ a text prefix such as "a photography of") --text decoder--> caption
    VQA:         question --text encoder (cross-attends to the image)--> question embeddings
                 [DEC] --text decoder (cross-attends to the question embeddings)--> answer

There is no soft prompt: the image (or the encoded question) is the decoder's cross-attention source,
projected into each layer's keys/values once per sequence at prefill (`CrossCache`). The image stage
`encode_images` runs once per image; its output is what the runner's embedding cache keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checkpoint.config import BlipConfig
from .bert import BlipTextLMHeadModel, BlipTextModel, pad_ids
from .family import Capabilities
from .kv_cache import AttnBatch, CrossCache
from .vision import VisionModel


class _BlipGenerator(nn.Module):
    """What BLIP's captioning and VQA models share: the image stage and the cached text decoder (a
    `GenerationModel`, `model.arch.family`)."""

    capabilities = Capabilities(generates=True)

    def __init__(self, cfg: BlipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = VisionModel(cfg.vision)
        self.text_decoder = BlipTextLMHeadModel(cfg.text)

    @property
    def device(self) -> torch.device:
        return self.vision_model.post_layernorm.weight.device

    @property
    def lm_dtype(self) -> torch.dtype:
        return self.text_decoder.cls.predictions.bias.dtype

    @property
    def image_tokens(self) -> int:
        """Length of the image features: CLS + one per patch."""
        return (self.cfg.vision.image_size // self.cfg.vision.patch_size) ** 2 + 1

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] -> image features [B, 1 + (S/P)^2, vision hidden size]."""
        return self.vision_model(pixel_values)

    def prompt_inputs(self, image: torch.Tensor, text_ids: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """One request's prefill input: its image features and its text ids."""
        if image.shape != (self.image_tokens, self.cfg.vision.hidden_size):
            raise ValueError(
                f"image features must be [{self.image_tokens}, {self.cfg.vision.hidden_size}], "
                f"got {tuple(image.shape)}"
            )
        return image, list(text_ids)

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: CrossCache,
        kv_len: int,
        dense: bool = False,
    ) -> torch.Tensor:
        """One new token per row at its own position; next-token logits [B, vocab] (fp32)."""
        batch = AttnBatch.decode(slots, positions, kv_len, dense)
        hidden = self.text_decoder.bert.decode(tokens[:, None], batch, cache)
        return self.text_decoder.logits(hidden[:, 0])

    def rows_logits(self, tokens: torch.Tensor, batch: AttnBatch, cache: CrossCache) -> torch.Tensor:
        """Logits [N, T, vocab] (fp32) of token rows over a cached prefix (`model.runtime.scoring`)."""
        return self.text_decoder.logits(self.text_decoder.bert.decode(tokens, batch, cache))

    def _start(self, slots: torch.Tensor, cache: CrossCache) -> torch.Tensor:
        """Run the decoder's first token, [DEC], at position 0 of `slots`."""
        start = torch.full_like(slots, self.cfg.text.bos_token_id)
        return self.decode(start, torch.zeros_like(slots), slots, cache, 1)


class BlipForConditionalGeneration(_BlipGenerator):
    """Image captioning, optionally continuing a text prefix ("a photography of")."""

    def new_cache(self, num_slots: int, max_len: int) -> CrossCache:
        return self.text_decoder.bert.new_cache(
            num_slots, max_len, self.image_tokens, self.lm_dtype, self.device
        )

    def prefill(
        self, inputs: Sequence[tuple[torch.Tensor, list[int]]], slots: torch.Tensor, cache: CrossCache
    ) -> torch.Tensor:
        """Cache each row's image keys/values, run its [DEC] + prefix; logits at its last token."""
        bert = self.text_decoder.bert
        images = torch.stack([image for image, _ in inputs]).to(self.lm_dtype)
        bert.fill_cross(images, torch.full_like(slots, images.shape[1]), slots, cache)
        ids, lengths = pad_ids([text for _, text in inputs], self.cfg.text.pad_token_id, slots.device)
        hidden = bert.decode(ids, AttnBatch.prefill(slots, ids.shape[1]), cache)
        last = hidden[torch.arange(len(inputs), device=slots.device), lengths - 1]
        return self.text_decoder.logits(last)


class BlipForQuestionAnswering(_BlipGenerator):
    """VQA: the question is encoded against the image; the answer is decoded from [DEC]."""

    def __init__(self, cfg: BlipConfig):
        super().__init__(cfg)
        self.text_encoder = BlipTextModel(cfg.text)

    def new_cache(self, num_slots: int, max_len: int) -> CrossCache:
        # The decoder's source is the encoded question, which fits in the positions of a prompt.
        return self.text_decoder.bert.new_cache(num_slots, max_len, max_len, self.lm_dtype, self.device)

    def prefill(
        self, inputs: Sequence[tuple[torch.Tensor, list[int]]], slots: torch.Tensor, cache: CrossCache
    ) -> torch.Tensor:
        """Encode each question against its image, cache the decoder's cross keys/values of the
        question embeddings (padding masked), then run [DEC]."""
        images = torch.stack([image for image, _ in inputs]).to(self.lm_dtype)
        ids, lengths = pad_ids([text for _, text in inputs], self.cfg.text.pad_token_id, slots.device)
        questions = self.text_encoder.encode(ids, lengths, images)
        self.text_decoder.bert.fill_cross(questions, lengths, slots, cache)
        return self._start(slots, cache)
