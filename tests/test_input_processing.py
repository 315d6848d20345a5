"""One request, built once: each family's input processor against transformers' processors and
`generate` inputs, the HTTP side building requests with no model, and the engine refusing requests that
would not fit it (`model.processing`, `model.frontend`, `model.request_checks`)."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import replace

import pytest
import torch
from oracle_blip import hf_tokenizer
from PIL import Image

from batching import EngineCore, Scheduler
from batching.engine_io import EngineIO
from batching.engine_process import engine_guard, request_from_message
from batching.process_client import ProcessClient
from batching.protocol import Info
from model.checkpoint.config import Blip2Config, read_config
from model.checkpoint.tiny import write_tiny_checkpoint
from model.data.tokenizer import TextTokenizer
from model.decoding.generation import SamplingParams
from model.engine import Blip2Engine
from model.frontend import Frontend
from model.processing import (
    Blip2OptProcessor,
    Blip2T5Processor,
    BlipCaptionProcessor,
    BlipVqaProcessor,
    InputProcessor,
    RetrievalProcessor,
    input_processor,
)
from model.request_checks import RequestGuard

PROMPT = "Question: what color is the bus? Answer:"


def hf_blip2_processor(root, num_query_tokens: int):
    from transformers import Blip2Processor, BlipImageProcessor

    return Blip2Processor(BlipImageProcessor(), hf_tokenizer(root), num_query_tokens=num_query_tokens)


@pytest.mark.parametrize("variant", ["pre_ln", "t5"])
def test_blip2_prompt_ids_are_blip2_processors_input_ids(checkpoints, variant):
    """OPT: the decoder's history is Blip2Processor's input_ids (the image placeholders before BOS);
    Flan-T5: those are the encoder's input and the decoder starts from its own start token."""
    root, hf = checkpoints(variant)
    processor = InputProcessor.from_dir(root)
    cfg = hf.config
    ref = hf_blip2_processor(root, cfg.num_query_tokens)
    image = Image.new("RGB", (8, 8))
    for prompt in (PROMPT, "a photo of", "" if variant == "t5" else None):
        inputs = processor.prompt(prompt)
        want = ref(images=image, text=prompt or "").input_ids[0]
        assert want[: cfg.num_query_tokens] == [cfg.image_token_index] * cfg.num_query_tokens
        if variant == "t5":
            assert isinstance(processor, Blip2T5Processor)
            assert [cfg.image_token_index] * cfg.num_query_tokens + inputs.text_ids == want
            assert inputs.prompt_ids == [cfg.text_config.decoder_start_token_id]
        else:
            assert isinstance(processor, Blip2OptProcessor)
            if prompt is None:  # captioning: generate's own start, placeholders + BOS
                want = [cfg.image_token_index] * cfg.num_query_tokens + [cfg.text_config.bos_token_id]
            assert inputs.prompt_ids == want
        assert inputs.prompt_tokens == cfg.num_query_tokens + len(inputs.text_ids)


def test_hub_opt_config_puts_32_image_tokens_50265_before_bos(tmp_path):
    """Salesforce/blip2-opt-*: `num_query_tokens` 32 and `image_token_index` 50265 in config.json."""
    root = write_tiny_checkpoint(tmp_path)
    cfg = replace(read_config(root / "config.json"), num_query_tokens=32, image_token_index=50265)
    processor = input_processor(cfg, TextTokenizer.from_dir(root))
    inputs = processor.prompt(PROMPT)
    assert inputs.prompt_ids[:32] == [50265] * 32 and inputs.prompt_ids[32:] == inputs.text_ids
    assert inputs.text_ids[0] == cfg.text.bos_token_id and inputs.prompt_tokens == 32 + len(inputs.text_ids)
    # The position limit: prompt + max_new_tokens - 1, and one past it is refused.
    assert processor.positions(inputs, 10) == 32 + len(inputs.text_ids) + 9
    room = processor.max_positions - len(inputs.prompt_ids) + 1
    assert processor.check_positions(inputs, room) == processor.max_positions
    with pytest.raises(ValueError, match="max_new_tokens"):
        processor.check_positions(inputs, room + 1)


def test_blip_processors_as_transformers_generate_takes_them(checkpoints):
    """BLIP captioning: the tokenizer's `[CLS] prefix [SEP]` with [CLS] -> [DEC] and [SEP] dropped (as
    `BlipForConditionalGeneration.generate` does); VQA: the question to the encoder, [DEC] to start."""
    for variant, cls in (("caption", BlipCaptionProcessor), ("vqa", BlipVqaProcessor)):
        root, _ = checkpoints(f"blip_{variant}")
        processor = InputProcessor.from_dir(root)
        assert isinstance(processor, cls)
        dec = read_config(root / "config.json").text.bos_token_id
        ids = hf_tokenizer(root)("a photography of").input_ids
        inputs = processor.prompt("a photography of")
        if variant == "caption":
            assert inputs.text_ids == inputs.prompt_ids == [dec, *ids[1:-1]]
            assert processor.prompt(None).prompt_ids == [dec]
        else:
            assert inputs.text_ids == ids and inputs.prompt_ids == [dec]
            with pytest.raises(ValueError, match="question"):
                processor.prompt(None)
        assert inputs.text_tokens == len(ids) - 2 and processor.vqa_template == "{question}"


def test_retrieval_processor_and_tasks(tmp_path):
    root = write_tiny_checkpoint(tmp_path)
    cfg = read_config(root / "config.json")
    tok = TextTokenizer.from_dir(root)
    retrieval = input_processor(replace(cfg, architectures=("Blip2ForImageTextRetrieval",)), tok)
    assert isinstance(retrieval, RetrievalProcessor) and retrieval.tasks == ("match", "embed")
    assert retrieval.max_positions == cfg.qformer.max_position_embeddings
    assert retrieval.retrieval_ids("a cat") == (tok.encode("a cat"), tok.count("a cat"))
    with pytest.raises(ValueError, match="generates no text"):
        retrieval.prompt("a cat")
    generator = input_processor(cfg, tok)
    assert generator.tasks == ("caption", "vqa") and isinstance(cfg, Blip2Config)
    with pytest.raises(ValueError, match="does not match"):
        generator.retrieval_ids("a cat")
    with pytest.raises(ValueError, match="not supported"):
        input_processor(replace(cfg, architectures=("Blip2Model",)), tok)


def test_the_http_side_builds_requests_without_any_module(tmp_path, monkeypatch):
    """Frontend (what an HTTP process holds) reads config and tokenizer only: no nn.Module is built."""
    root = write_tiny_checkpoint(tmp_path)
    built = []
    original = torch.nn.Module.__init__

    def counting(self, *args, **kwargs):
        built.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__init__", counting)
    frontend = Frontend.from_dir(root, "tiny")
    side = frontend.image_processor
    pixels = torch.zeros(3, side.height, side.width)
    request = frontend.request(pixels, "k", PROMPT, SamplingParams(max_new_tokens=4))
    scoring = frontend.scoring_request(pixels, "k", PROMPT, ["red", "blue"])
    assert request.positions == len(request.prompt_ids) + 3 and scoring.candidates
    torch.nn.Linear(2, 2)  # the patch does see a module being built
    assert built == ["Linear"]


def test_the_engine_refuses_what_does_not_fit_it(tmp_path):
    root = write_tiny_checkpoint(tmp_path)
    frontend = Frontend.from_dir(root, "tiny")
    side = frontend.image_processor
    h, w = side.height, side.width
    guard = RequestGuard(frontend.processor, h, w, max_len=40, num_slots=2)
    good = frontend.request(torch.zeros(3, h, w), "k", PROMPT, SamplingParams(max_new_tokens=4))
    assert guard.check(good) is good
    vocab = frontend.processor.vocab_size
    bad = [
        ("pixel_values", replace(good, pixel_values=torch.zeros(3, h, w + 1))),
        ("pixel_values", replace(good, pixel_values=torch.zeros(3, h, w, dtype=torch.uint8))),
        ("pixel_values", replace(good, pixel_values=None)),
        ("inconsistent", replace(good, positions=good.positions - 1)),
        (
            "this engine has 40",
            replace(good, params=SamplingParams(max_new_tokens=40), positions=good.positions + 36),
        ),
        ("rows", replace(good, params=SamplingParams(max_new_tokens=4, num_beams=3))),
        ("text_ids", replace(good, text_ids=[*good.text_ids[:-1], vocab])),
        ("text_ids", replace(good, prompt_ids=[-1, *good.prompt_ids[1:]])),
    ]
    for what, request in bad:
        with pytest.raises(ValueError, match=what):
            guard.check(request)
    scoring = frontend.scoring_request(torch.zeros(3, h, w), "k", PROMPT, ["red"])
    assert guard.check(scoring) is scoring
    with pytest.raises(ValueError, match="inconsistent"):
        guard.check(replace(scoring, prefix_positions=1))
    with pytest.raises(ValueError, match="candidates"):
        guard.check(replace(scoring, candidates=[[1] * frontend.max_positions]))


def test_an_engine_rejects_an_oversized_request_cleanly_and_serves_on(tmp_path):
    """Over the socket: a request past the engine's cache is a ValueError at the client (a 422), and
    the engine serves the next one."""
    from batching.metrics import Metrics
    from server.settings import Settings

    engine = Blip2Engine.from_pretrained()
    settings = Settings(
        model="tiny-random",
        device="cpu",
        max_running_seqs=2,
        max_wait_ms=0,
        max_prompt_tokens=1,
        max_new_tokens_limit=1,
    )
    from batching.engine_process import build_engine_core

    loop: EngineCore = build_engine_core(settings, engine, Metrics())
    assert isinstance(loop.scheduler, Scheduler) and loop.runner.max_len == settings.max_len == 66
    build = request_from_message(engine_guard(engine, loop.runner))
    info = Info("tiny", "cpu", "float32", os.getpid())
    core = EngineIO(loop, build, info, lambda: b"", lambda *a: None)
    address = f"ipc://{tmp_path}/engine.sock"
    thread = threading.Thread(target=core.serve, args=(address,), daemon=True)
    thread.start()
    side = engine.image_processor
    pixels = torch.rand(3, side.height, side.width)

    async def main():
        client = ProcessClient(address, thread.is_alive)
        await client.connect()
        long = engine.request(pixels, "k", None, SamplingParams(max_new_tokens=60))  # 68 positions
        with pytest.raises(ValueError, match="this engine has 66"):
            await client.add(long)
        ok = await client.submit(engine.request(pixels, "k", None, SamplingParams(max_new_tokens=3)))
        assert ok.ok and len(ok.outputs[0].tokens) <= 3
        await client.close()

    try:
        asyncio.run(main())
    finally:
        loop.stop_accepting(drain=True)
        thread.join(10)
