"""Half precision as the reference computes it. Every family in fp16 and bf16 against transformers loaded in
the same dtype (`from_pretrained(dtype=...)`: it keeps its `_keep_in_fp32_modules` in fp32 for fp16 only):
the parameters each keeps in fp32, greedy tokens, retrieval scores; and Flan-T5 checkpoints whose
activations pass fp16's 65504, as real Flan-T5 layers do (transformers #9295, #21574), which answered
nothing but pad tokens in fp16 when the feed-forward output was cast back to fp16."""

from __future__ import annotations

import pytest
import torch
from conftest import random_pixels
from oracle import hf_generate, make_checkpoint
from oracle_blip import BLIP2_IMAGE_SIZE, IMAGE_SIZE, hf_blip_generate, hf_tokenizer

from model import Blip2Engine, SamplingParams
from model.checkpoint.loader import map_name
from model.frontend import Frontend

transformers = pytest.importorskip("transformers")

FP16 = torch.float16
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.slow, id="torch.bfloat16")
FP16_MAX = torch.finfo(torch.float16).max
# Where greedy tokens may part ways: a tie within two roundings of a logit of 4-8 (the tiny checkpoints'
# logits are 4-16). Measured: every difference was at a margin of 0-1/1024 (fp16), 1/64-1/32 (bf16); 3 of
# 80 fp16 greedy runs had one (BLIP's attention is eager fp16 in transformers, SDPA here).
TIES = {torch.float16: 2**-6, torch.bfloat16: 2**-4}
NEW_TOKENS = 6
PROMPTS = {  # one image each
    "pre_ln": [None, "Question: what is in the picture? Answer:"],
    "t5": [None, "Question: what is in the picture? Short answer:"],
    "blip_caption": [None, "a photo of"],
    "blip_vqa": ["what is in the picture?", "how many dogs are there?"],
}
SIZES = {
    "blip_caption": IMAGE_SIZE,
    "blip_vqa": IMAGE_SIZE,
    "blip_itm": IMAGE_SIZE,
    "blip2_itm": BLIP2_IMAGE_SIZE,
}


def hf_in(root, dtype: torch.dtype):
    """The checkpoint at `root` as transformers loads it in `dtype`."""
    arch = transformers.AutoConfig.from_pretrained(str(root)).architectures[0]
    return getattr(transformers, arch).from_pretrained(str(root), dtype=dtype).eval()


def reference_tokens(engine: Blip2Engine, hf, root, image: torch.Tensor, prompt: str | None) -> list[int]:
    """transformers' greedy tokens for one image and prompt, as our `generate` reports them."""
    if isinstance(hf, (transformers.BlipForConditionalGeneration, transformers.BlipForQuestionAnswering)):
        ids = hf_tokenizer(root)(prompt).input_ids if prompt else None
        return hf_blip_generate(hf, image, ids, max_new_tokens=NEW_TOKENS)
    if engine.cfg.is_encoder_decoder:
        ids = engine.cfg.num_query_tokens * [engine.cfg.image_token_index] + engine.text_ids(prompt)
        ref = hf_generate(hf, image, ids, max_new_tokens=NEW_TOKENS)
        return [t for t in ref if t != engine.cfg.text.pad_token_id]
    ids = engine.prompt_ids(engine.text_ids(prompt)) if prompt else None
    return hf_generate(hf, image, ids, max_new_tokens=NEW_TOKENS)


def assert_same_up_to_a_tie(result, ref: list[int], tie: float) -> None:
    """Our greedy tokens are the reference's, or part ways only where our own two candidates (ours and the
    reference's token) are within `tie` of each other in log-probability (= logit) at the first difference."""
    got = result.token_ids
    if got == ref:
        return
    t = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), min(len(got), len(ref)))
    assert t < min(len(got), len(ref)), (got, ref)
    chosen = result.outputs[0].logprobs[t]
    alternatives = dict(chosen.top)
    assert ref[t] in alternatives, (got, ref, chosen)
    assert chosen.logprob - alternatives[ref[t]] <= tie, (got, ref, chosen)


def assert_greedy_equal(variant: str, root, dtype: torch.dtype) -> list[str]:
    """Greedy tokens (an image per prompt, one batch) equal transformers' in `dtype`, up to a tie within
    the dtype's rounding (`TIES`). Returns our texts."""
    engine = Blip2Engine.from_pretrained(str(root), dtype=dtype)
    hf = hf_in(root, dtype)
    prompts = PROMPTS[variant]
    images = random_pixels(len(prompts), size=SIZES.get(variant, 56), seed=5)
    ours = engine.generate(list(images), prompts, SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=5))
    for image, prompt, result in zip(images, prompts, ours, strict=True):
        ref = reference_tokens(engine, hf, root, image, prompt)
        assert_same_up_to_a_tie(result, ref, TIES[dtype])
    return [r.text for r in ours]


@pytest.mark.parametrize("dtype", [FP16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["pre_ln", "t5", "blip_caption", "blip_vqa", "blip_itm", "blip2_itm"])
def test_parameters_kept_in_float32_are_transformers(checkpoints, variant, dtype):
    """Each checkpoint tensor lands in the dtype transformers gives it: fp16 keeps the Q-Former, the
    learned queries and T5's `wo` in fp32; bf16 (float32's range) keeps nothing in fp32."""
    root = checkpoints(variant)[0]
    ours = dict(Blip2Engine.from_pretrained(str(root), dtype=dtype).model.named_parameters())
    kept = []
    for name, param in hf_in(root, dtype).named_parameters():
        target = map_name(name)[0]
        if target in ours:
            assert ours[target].dtype == param.dtype, name
            kept += [name] if param.dtype == torch.float32 else []
    assert bool(kept) == (dtype == FP16 and variant in ("pre_ln", "t5", "blip2_itm")), kept
    if variant == "t5" and dtype == FP16:
        assert sum(".DenseReluDense.wo." in n for n in kept) == 4  # 2 encoder + 2 decoder blocks


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=str)
@pytest.mark.parametrize("variant", list(PROMPTS))
def test_greedy_tokens_equal_transformers_in_the_same_dtype(checkpoints, variant, dtype):
    assert_greedy_equal(variant, checkpoints(variant)[0], dtype)


@pytest.mark.parametrize(
    "dtype, tol", [(FP16, 2e-3), pytest.param(torch.bfloat16, 1e-2, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("variant", ["blip2_itm", "blip_itm"])
def test_retrieval_scores_equal_transformers_in_the_same_dtype(checkpoints, variant, dtype, tol):
    """ITM probability and ITC similarity as transformers' in the same dtype (measured apart: 4e-4 in
    fp16, 3e-3 in bf16, the size of transformers' own fp16 / bf16 vs fp32 differences)."""
    root = checkpoints(variant)[0]
    engine, hf, tok = (
        Blip2Engine.from_pretrained(str(root), dtype=dtype),
        hf_in(root, dtype),
        hf_tokenizer(root),
    )
    image = random_pixels(1, size=SIZES[variant], seed=3)[0]
    texts = ["a photo of a cat", "two dogs playing in the snow"]
    ours = engine.match(image, texts)
    for i, text in enumerate(texts):
        ids = tok(text).input_ids
        args = {
            "pixel_values": image[None].to(dtype),
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids)),
        }
        with torch.no_grad():
            if variant == "blip2_itm":
                itm = hf(**args, use_image_text_matching_head=True).logits_per_image
                itc = hf(**args, use_image_text_matching_head=False).logits_per_image
            else:
                itm, itc = hf(**args, use_itm_head=True).itm_score, hf(**args, use_itm_head=False).itm_score
        assert ours.itm[i] == pytest.approx(itm.float().softmax(-1)[0, 1].item(), abs=tol)
        assert ours.itc[i] == pytest.approx(itc.float().item(), abs=tol)


# Which weight to scale so that the Flan-T5's activations reach PEAK (as in real Flan-T5 layers): a
# feed-forward output of the encoder or the decoder (T5's known overflow), or a self-attention output
# (which transformers clamps into fp16's range while the residual stream is still fp16).
OVERFLOWS = {
    "encoder_ff": "language_model.encoder.block.1.layer.1.DenseReluDense.wo.weight",
    "decoder_ff": "language_model.decoder.block.0.layer.2.DenseReluDense.wo.weight",
    "attention": "language_model.encoder.block.0.layer.0.SelfAttention.o.weight",
}
PEAK = 2e5


def peak_activation(hf, name: str, ids: list[int]) -> float:
    """The largest |output| of the module owning parameter `name` while transformers generates."""
    seen: list[float] = []
    module = hf.get_submodule(name.removesuffix(".weight"))
    hook = module.register_forward_hook(lambda m, i, out: seen.append(out.abs().max().item()))
    try:
        hf_generate(hf, random_pixels(1, seed=5)[0], ids, max_new_tokens=3)
    finally:
        hook.remove()
    return max(seen)


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """Flan-T5 checkpoints, each with one weight scaled so that its output peaks near PEAK: the root and
    the peak measured with the scaled weight (fp32 transformers)."""
    made: dict[str, tuple[object, float]] = {}

    def get(where: str):
        if where not in made:
            root = tmp_path_factory.mktemp(f"t5-{where}")
            hf = make_checkpoint(root, "t5")
            engine = Frontend.from_dir(root, "t5")
            ids = engine.cfg.num_query_tokens * [engine.cfg.image_token_index] + engine.text_ids(None)
            name = OVERFLOWS[where]
            with torch.no_grad():
                hf.get_parameter(name).mul_(PEAK / peak_activation(hf, name, ids))
            hf.save_pretrained(root)
            made[where] = (root, peak_activation(hf, name, ids))
        return made[where]

    return get


@pytest.mark.parametrize("dtype", [FP16, BF16], ids=str)
@pytest.mark.parametrize(
    "where", ["encoder_ff", pytest.param("decoder_ff", marks=pytest.mark.slow), "attention"]
)
def test_flan_t5_past_the_fp16_range_answers_as_transformers(overflowing, where, dtype):
    root, peak = overflowing(where)
    assert peak > FP16_MAX  # the checkpoint does what the test is about
    texts = assert_greedy_equal("t5", root, dtype)
    assert all(t.strip() for t in texts), f"an empty answer (the activations overflowed): {texts}"
