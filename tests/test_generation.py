"""Sampling, parameter validation, and the projected-embedding OPT against transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import random_pixels

from model import Blip2Engine, SamplingParams
from model.arch.opt import OPTForCausalLM
from model.checkpoint.config import OPTConfig
from model.decoding.generation import SamplingError
from model.decoding.sampling import warp_rows


@pytest.fixture(scope="module")
def engine(checkpoints):
    return Blip2Engine.from_pretrained(str(checkpoints("pre_ln")[0]))


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    pixels = list(random_pixels(3, seed=2))
    params = SamplingParams(do_sample=True, seed=123, max_new_tokens=10, temperature=1.5)
    solo = engine.generate(pixels[:1], None, params)[0].token_ids
    again = engine.generate(pixels[:1], None, params)[0].token_ids
    batched = engine.generate(pixels, None, [params, SamplingParams(), SamplingParams(do_sample=True)])[
        0
    ].token_ids
    assert solo == again == batched
    other = engine.generate(
        pixels[:1], None, SamplingParams(do_sample=True, seed=124, max_new_tokens=10, temperature=1.5)
    )
    assert other[0].token_ids != solo


def test_top_k_one_is_greedy(engine):
    pixels = list(random_pixels(2, seed=4))
    greedy = engine.generate(pixels, None, SamplingParams(max_new_tokens=8))
    sampled = engine.generate(pixels, None, SamplingParams(do_sample=True, top_k=1, max_new_tokens=8, seed=9))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in sampled]


def test_warpers_match_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = logits
    for warper in [TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)]:
        ref = warper(None, ref)
    torch.testing.assert_close(warp_rows(logits, [0.7] * 2, [10] * 2, [0.8] * 2), ref)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_new_tokens": 0},
        {"min_new_tokens": 50, "max_new_tokens": 10},
        {"num_beams": 0},
        {"temperature": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0},
        {"temperature": 1e-300},  # logits / temperature overflow to inf
        {"repetition_penalty": 1e-300},
        {"do_sample": True, "num_beams": 2},
    ],
)
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


INTEGERS = {
    "max_new_tokens": 3,
    "min_new_tokens": 1,
    "num_beams": 2,
    "top_k": 5,
    "n": 2,
    "seed": 7,
    "logprobs": 2,
    "no_repeat_ngram_size": 2,
}


@pytest.mark.parametrize("name", sorted(INTEGERS))
def test_integer_settings_must_be_integers(name):
    """A count or seed given as a float (3.5, or 3.0) or a bool is a SamplingError naming it, not a
    TypeError inside torch later; the same value as an int is taken."""
    base = {"num_beams": 2} if name == "n" else {}
    assert getattr(SamplingParams(**base, **{name: INTEGERS[name]}), name) == INTEGERS[name]
    for wrong in (INTEGERS[name] + 0.5, float(INTEGERS[name]), True):
        with pytest.raises(SamplingError) as exc:
            SamplingParams(**base, **{name: wrong})
        assert exc.value.field == name and str(exc.value) == f"{name}: must be an integer, got {wrong!r}"


def test_float_settings_take_integers_but_not_bools():
    params = SamplingParams(temperature=2, top_p=1, repetition_penalty=1, length_penalty=-1, do_sample=True)
    assert (params.temperature, params.top_p, params.length_penalty) == (2, 1, -1)
    for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
        with pytest.raises(SamplingError, match=f"^{name}: must be a number, got True$"):
            SamplingParams(**{name: True})
        with pytest.raises(SamplingError, match=f"^{name}: must be a number, got '1'$"):
            SamplingParams(**{name: "1"})


def test_none_do_sample_and_stop_lists_are_checked_as_the_http_schema_does():
    """None only where it means something (seed, logprobs); do_sample a bool ("no" sampled before);
    stop a list of at most 4 strings of 1-100 characters, as over HTTP (5 were accepted offline)."""
    assert SamplingParams(seed=None, logprobs=None).seed is None
    for name, wrong, problem in (
        ("n", None, "must be an integer, got None"),
        ("num_beams", None, "must be an integer, got None"),
        ("temperature", None, "must be a number, got None"),
        ("do_sample", "no", "must be True or False, got 'no'"),
        ("stop", None, "must be a list of up to 4 strings, got None"),
        ("stop", "man", "must be a list of up to 4 strings, got 'man'"),
        ("stop", ["a"] * 5, "must be a list of up to 4 strings, got ['a', 'a', 'a', 'a', 'a']"),
        ("stop", ["x" * 101], "each stop string must be 1 to 100 characters"),
        ("stop", [""], "each stop string must be 1 to 100 characters"),
    ):
        with pytest.raises(SamplingError) as exc:
            SamplingParams(**{name: wrong})
        assert exc.value.field == name and str(exc.value) == f"{name}: {problem}"
    assert SamplingParams(stop=["a", "b", "c", "x" * 100]).stop == ["a", "b", "c", "x" * 100]


def test_prompt_longer_than_model_is_rejected(engine):
    with pytest.raises(ValueError, match="positions"):
        engine.generate([random_pixels(1)[0]], ["cat " * 200])


def test_prompt_with_image_placeholder_is_rejected(engine):
    with pytest.raises(ValueError, match="placeholder"):
        engine.generate([random_pixels(1)[0]], ["look <image> here"])


@pytest.mark.parametrize("pre_ln", [True, False])
def test_projected_embeddings_opt_matches_transformers(pre_ln):
    """word_embed_proj_dim != hidden_size (project_in / project_out), text only, greedy."""
    from oracle import scale_weights
    from transformers import OPTConfig as HFOPTConfig
    from transformers import OPTForCausalLM as HFOPT

    kw = dict(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=96,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        do_layer_norm_before=pre_ln,
        eos_token_id=7,
    )
    torch.manual_seed(0)
    hf = HFOPT(HFOPTConfig(**kw)).eval()
    scale_weights(hf, seed=1)
    ours = OPTForCausalLM(OPTConfig(**kw)).eval()
    state = {k: v for k, v in hf.state_dict().items()}
    for i in range(2):
        pre = f"model.decoder.layers.{i}.self_attn."
        for p in ("weight", "bias"):
            state[pre + f"qkv_proj.{p}"] = torch.cat([state.pop(pre + f"{x}_proj.{p}") for x in "qkv"])
    ours.load_state_dict(state)
    assert ours.decoder.project_in is not None

    prompt = [2, 15, 33, 8, 90]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False, pad_token_id=1)[
            0, 5:
        ].tolist()
        cache = ours.new_cache(1, 32, torch.float32, "cpu")
        from model.arch.kv_cache import AttnBatch

        slots = torch.tensor([0])
        x = ours.token_embeddings(torch.tensor([prompt]))
        logits = ours.logits(ours(x, AttnBatch.prefill(slots, 5), cache))[:, -1]
        got = []
        for step in range(15):
            token = int(logits.argmax(-1))
            got.append(token)
            if token == 7:
                break
            pos = torch.tensor([5 + step])
            x = ours.token_embeddings(torch.tensor([[token]]))
            logits = ours.logits(ours(x, AttnBatch.decode(slots, pos, 6 + step), cache))[:, -1]
    assert got == ref


def test_same_image_object_runs_vision_once(engine, monkeypatch):
    calls = []
    original = engine.model.encode_images
    monkeypatch.setattr(engine.model, "encode_images", lambda px: calls.append(px.shape[0]) or original(px))
    image = random_pixels(1, seed=8)[0]
    other = random_pixels(1, seed=9)[0]
    prompts = ["Question: what is it? Answer:", "Question: what color? Answer:", None]
    out = engine.generate([image, image, other], prompts, SamplingParams(max_new_tokens=5))
    assert calls == [2]  # one vision batch, two distinct images
    solo = engine.generate([image], [prompts[1]], SamplingParams(max_new_tokens=5))[0]
    assert out[1].token_ids == solo.token_ids
