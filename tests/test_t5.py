"""Our T5 encoder-decoder (the language model of BLIP-2 Flan-T5) against transformers' T5, step by step."""

from __future__ import annotations

import pytest
import torch

from model.arch.t5 import T5Config, T5ForConditionalGeneration

transformers = pytest.importorskip("transformers")


def tiny(tie: bool, gated: bool) -> tuple[T5ForConditionalGeneration, object]:
    raw = dict(
        vocab_size=96,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu" if gated else "relu",
        tie_word_embeddings=tie,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**raw)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    ours = T5ForConditionalGeneration(T5Config.from_dict(raw)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing, missing
    assert set(unexpected) <= {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    return ours, hf


@pytest.mark.parametrize("tie, gated", [(False, True), (True, False)])
def test_t5_matches_transformers_step_by_step(tie, gated):
    ours, hf = tiny(tie, gated)
    lengths = [21, 13]  # past max_distance: log-spaced buckets; padding in the second row
    ids = torch.randint(2, 96, (2, max(lengths)))
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    steps = 7
    decoder_ids = torch.cat(
        [torch.zeros(2, 1, dtype=torch.long), torch.randint(2, 96, (2, steps - 1))], dim=1
    )
    with torch.no_grad():
        ref_enc = hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        enc = ours.encode(ours.token_embeddings(ids), torch.tensor(lengths))
        for row, n in enumerate(lengths):
            torch.testing.assert_close(enc[row, :n], ref_enc[row, :n], atol=1e-5, rtol=1e-5)
        slots = torch.tensor([3, 1])  # any slots of a bigger cache
        caches = ours.new_cache(4, 16, 32, torch.float32, "cpu")
        ours.fill_cross(enc, torch.tensor(lengths), slots, caches)
        for t in range(steps):
            logits = ours.decode(decoder_ids[:, t], torch.tensor([t, t]), slots, caches, t + 1)
            torch.testing.assert_close(logits, ref[:, t], atol=1e-4, rtol=1e-4)


def test_t5_rows_at_different_positions_share_a_step():
    """Continuous batching: a row that joined later decodes beside an older one, each as if alone."""
    ours, hf = tiny(False, True)
    ids = torch.randint(2, 96, (2, 9))
    with torch.no_grad():
        caches = ours.new_cache(2, 16, 16, torch.float32, "cpu")
        enc = ours.encode(ours.token_embeddings(ids), torch.tensor([9, 9]))
        ours.fill_cross(enc, torch.tensor([9, 9]), torch.tensor([0, 1]), caches)
        seq = [0, 5, 7, 9]
        for t in range(3):  # row 0 runs 3 steps alone
            ours.decode(torch.tensor([seq[t]]), torch.tensor([t]), torch.tensor([0]), caches, t + 1)
        both = ours.decode(torch.tensor([seq[3], 0]), torch.tensor([3, 0]), torch.tensor([0, 1]), caches, 4)
        ref = hf(input_ids=ids, decoder_input_ids=torch.tensor([seq, [0, 0, 0, 0]])).logits
    torch.testing.assert_close(both[0], ref[0, 3], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], ref[1, 0], atol=1e-4, rtol=1e-4)
