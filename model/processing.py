"""Input processors: a checkpoint's prompt rules, from its config and tokenizer alone (no model behind them).

One class per model family says how a prompt becomes token ids and how many positions a request takes,
as vLLM's `Blip2ProcessingInfo` / `Blip2MultiModalProcessor` (`vllm/model_executor/models/blip2.py`)
do for BLIP-2 there:

- BLIP-2 with OPT: the decoder reads `num_query_tokens` `<image>` placeholders (id `image_token_index`,
  50265 on the hub checkpoints), then the prompt (BOS first), as transformers' `Blip2Processor` makes
  its `input_ids`; the query embeddings take the placeholders' positions.
- BLIP-2 with Flan-T5: the placeholders and the prompt (ending in `</s>`) go to the encoder; the decoder
  starts from its own start token (`decoder_start_token_id`).
- BLIP captioning: `[DEC]` and the optional text prefix, no `[SEP]` (the caption continues it).
- BLIP VQA: the question (`[CLS] question [SEP]`) goes to the text encoder; the answer decoder starts
  from `[DEC]`.
- Retrieval (BLIP-2 and BLIP `...ForImageTextRetrieval`): texts as the tokenizer makes them.

The HTTP process builds requests with these rules (tokenizing once); the engine process trusts what it
receives and checks only what protects it (`model.request_checks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint.config import Blip2Config, BlipConfig, architecture, read_config
from .data.tokenizer import TextTokenizer


def needed_positions(prompt: int, max_new_tokens: int) -> int:
    """Positions a sequence of `prompt` tokens takes in the decoder's cache (and position embeddings)
    to generate `max_new_tokens`: each new token but the last is fed back (as in transformers, whose
    `generate` never runs the model on its final token), so prompt + max_new_tokens - 1."""
    return prompt + max_new_tokens - 1


@dataclass(frozen=True)
class PromptInputs:
    """A prompt as the engine takes it."""

    text_ids: list[int]  # what the prefill reads after the image (BOS first for OPT)
    prompt_ids: list[int]  # the decoder's starting token history (penalties, n-grams, positions)
    prompt_tokens: int  # positions the prompt takes: image queries + text (usage.prompt_tokens)
    text_tokens: int = 0  # tokens of the prompt's text alone, without special ones (its length limit)


class InputProcessor:
    """The rules every family shares; subclasses say how a prompt is tokenized and where it goes."""

    tasks: tuple[str, ...] = ()
    vqa_template: str | None = None
    # Candidates end with the model's end token (answer decoders: Flan-T5, BLIP VQA), see
    # `model.runtime.scoring`.
    candidates_end_with_eos = False

    def __init__(self, cfg: Blip2Config | BlipConfig, tokenizer: TextTokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, root: str | Path) -> InputProcessor:
        """The processor of the checkpoint in directory `root` (its config.json and tokenizer files)."""
        root = Path(root)
        return input_processor(read_config(root / "config.json"), TextTokenizer.from_dir(root))

    @property
    def max_positions(self) -> int:
        """Positions of the text model: the language model's (Flan-T5: 512 as trained), or the retrieval
        text encoder's."""
        return self.cfg.max_text_positions

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.cfg.eos_token_ids

    @property
    def generates(self) -> bool:
        return "caption" in self.tasks or "vqa" in self.tasks

    def text_ids(self, prompt: str | None) -> list[int]:
        """Prompt ids as the checkpoint's tokenizer and processor make them. ValueError for a prompt
        this family cannot take."""
        return self.tokenize(prompt)[0]

    def tokenize(self, prompt: str | None) -> tuple[list[int], int]:
        """`text_ids(prompt)` and the number of tokens of the prompt's text (special ones left out),
        from one tokenization."""
        raise ValueError(f"this model generates no text: it serves {self.tasks}")

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        """The token history the decoder starts from (repetition penalty, n-grams, positions)."""
        return list(text_ids)

    def prompt_tokens(self, text_ids: list[int]) -> int:
        """Positions the prompt takes in the text model: the image queries (BLIP-2), then the text."""
        return len(text_ids)

    def prompt(self, prompt: str | None) -> PromptInputs:
        """`prompt` tokenized once, with what the engine needs of it."""
        text_ids, count = self.tokenize(prompt)
        return PromptInputs(text_ids, self.prompt_ids(text_ids), self.prompt_tokens(text_ids), count)

    def positions(self, inputs: PromptInputs, max_new_tokens: int) -> int:
        """Cache positions a request needs: its prompt and answer but the answer's last token (an
        encoder-decoder: the longer of the encoder's input and the decoder's start + answer)."""
        return max(needed_positions(len(inputs.prompt_ids), max_new_tokens), inputs.prompt_tokens)

    def check_positions(self, inputs: PromptInputs, max_new_tokens: int) -> int:
        """`positions`, or ValueError (naming prompt and max_new_tokens) past the model's positions."""
        positions = self.positions(inputs, max_new_tokens)
        if positions > self.max_positions:
            raise ValueError(
                f"prompt ({inputs.prompt_tokens} positions) + max_new_tokens ({max_new_tokens}) - 1 "
                f"exceeds the model's {self.max_positions} positions (the last new token takes none)"
            )
        return positions

    def candidate_ids(self, prompt: str | None, text: str) -> list[int]:
        """The token ids a scoring candidate is (`model.runtime.scoring`); [] when `text` is blank:
        an answer decoder's are the candidate's tokens and its end token; a continuation's, the tokens
        of " " + candidate after a text prompt, of the candidate alone after none."""
        text = text.strip()
        if not text:
            return []
        if self.candidates_end_with_eos:
            return [*self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids, self.eos_ids[0]]
        spaced = " " + text if prompt else text
        return self.tokenizer.tokenizer.encode(spaced, add_special_tokens=False).ids

    def retrieval_ids(self, text: str) -> tuple[list[int], int]:
        """A retrieval text's ids and its own tokens' count (special ones left out), from one
        tokenization. ValueError for a model that does not match or embed."""
        raise ValueError(f"this model does not match or embed: it serves {self.tasks}")

    @property
    def vocab_size(self) -> int:
        """Token ids the text model embeds (and the logits cover): each id is below this."""
        return self.cfg.text.vocab_size


class Blip2OptProcessor(InputProcessor):
    """BLIP-2 with OPT: `num_query_tokens` image placeholders, then the prompt (BOS first)."""

    tasks = ("caption", "vqa")
    vqa_template = "Question: {question} Answer:"

    def tokenize(self, prompt: str | None) -> tuple[list[int], int]:
        """The prompt's ids (BOS first); no prompt (captioning): BOS alone, as BLIP-2's processor."""
        return self._no_placeholder(
            self.tokenizer.encode_counted(prompt) if prompt else ([self.cfg.text.bos_token_id], 0)
        )

    def _no_placeholder(self, tokens: tuple[list[int], int]) -> tuple[list[int], int]:
        if self.cfg.image_token_index is not None and self.cfg.image_token_index in tokens[0]:
            raise ValueError("the prompt must not contain the image placeholder token")
        return tokens

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        """Placeholders and prompt: transformers' `input_ids`. Older configs have no placeholder id; the
        pad id then stands in (it only matters to repetition_penalty)."""
        placeholder = self.cfg.image_token_index
        if placeholder is None:
            placeholder = self.cfg.text.pad_token_id
        return [placeholder] * self.cfg.num_query_tokens + list(text_ids)

    def prompt_tokens(self, text_ids: list[int]) -> int:
        return self.cfg.num_query_tokens + len(text_ids)


class Blip2T5Processor(Blip2OptProcessor):
    """BLIP-2 with Flan-T5: placeholders and prompt to the encoder; the decoder's start token alone."""

    vqa_template = "Question: {question} Short answer:"
    candidates_end_with_eos = True

    def tokenize(self, prompt: str | None) -> tuple[list[int], int]:
        """The prompt's ids (ending in `</s>`); no prompt: `</s>` alone, as BLIP-2's processor."""
        return self._no_placeholder(self.tokenizer.encode_counted(prompt or ""))

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        return [self.cfg.text.decoder_start_token_id]


class BlipCaptionProcessor(InputProcessor):
    """BLIP captioning, optionally continuing a text prefix ("a photography of")."""

    tasks = ("caption",)
    vqa_template = "{question}"  # BLIP's VQA model takes the bare question

    def tokenize(self, prompt: str | None) -> tuple[list[int], int]:
        """[DEC] + the prefix's tokens. As transformers: the tokenizer's `[CLS] prefix [SEP]` with [CLS]
        replaced by [DEC] and the [SEP] dropped (the caption continues the prefix)."""
        if not prompt:
            return [self.cfg.text.bos_token_id], 0
        ids, count = self.tokenizer.encode_counted(prompt)
        return [self.cfg.text.bos_token_id, *ids[1:-1]], count


class BlipVqaProcessor(InputProcessor):
    """BLIP VQA: the question goes to the text encoder; the answer decoder starts from [DEC]."""

    tasks = ("vqa",)
    vqa_template = "{question}"
    candidates_end_with_eos = True

    def tokenize(self, prompt: str | None) -> tuple[list[int], int]:
        """The question as the tokenizer makes it (`[CLS] question [SEP]`); ValueError without one."""
        if not prompt:
            raise ValueError("this model answers questions: a question is required")
        return self.tokenizer.encode_counted(prompt)

    def prompt_ids(self, text_ids: list[int]) -> list[int]:
        return [self.cfg.text.bos_token_id]


class RetrievalProcessor(InputProcessor):
    """Image-text matching and embeddings: texts as the tokenizer makes them (`[CLS] text [SEP]`)."""

    tasks = ("match", "embed")

    @property
    def max_positions(self) -> int:
        """The text encoder's positions: BLIP-2's Q-Former text branch, or BLIP's BERT."""
        if isinstance(self.cfg, Blip2Config):
            return self.cfg.qformer.max_position_embeddings
        return self.cfg.text.max_position_embeddings

    def retrieval_ids(self, text: str) -> tuple[list[int], int]:
        return self.tokenizer.encode_counted(text)

    @property
    def vocab_size(self) -> int:
        """BLIP-2's Q-Former text branch's vocabulary, or BLIP's BERT's."""
        if isinstance(self.cfg, Blip2Config):
            return self.cfg.qformer.vocab_size
        return self.cfg.text.vocab_size


PROCESSORS: dict[str, type[InputProcessor]] = {
    "Blip2ForConditionalGeneration": Blip2OptProcessor,
    "BlipForConditionalGeneration": BlipCaptionProcessor,
    "BlipForQuestionAnswering": BlipVqaProcessor,
    "Blip2ForImageTextRetrieval": RetrievalProcessor,
    "BlipForImageTextRetrieval": RetrievalProcessor,
}


def input_processor(cfg: Blip2Config | BlipConfig, tokenizer: TextTokenizer) -> InputProcessor:
    """The processor of the architecture `cfg` names (ValueError for one that is not supported)."""
    name = architecture(cfg)
    if name not in PROCESSORS:
        raise ValueError(f"architecture {name!r} is not supported (supported: {sorted(PROCESSORS)})")
    cls = PROCESSORS[name]
    if cls is Blip2OptProcessor and cfg.is_encoder_decoder:
        cls = Blip2T5Processor
    return cls(cfg, tokenizer)
