"""Checkpoint loading: layouts, dtypes, legacy names, and errors that name the tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_pixels
from oracle import make_checkpoint
from safetensors.torch import load_file, save_file

from model import Blip2Engine, SamplingParams
from model.checkpoint import loader


def _caption_ids(engine: Blip2Engine, n: int = 10) -> list[list[int]]:
    return [
        r.token_ids
        for r in engine.generate(list(random_pixels(2, seed=1)), None, SamplingParams(max_new_tokens=n))
    ]


@pytest.fixture(scope="module")
def reference(checkpoints):
    root, _ = checkpoints("pre_ln")
    return root, _caption_ids(Blip2Engine.from_pretrained(str(root)))


def test_sharded_checkpoint_loads_identically(tmp_path, reference):
    root, expected = reference
    make_checkpoint(tmp_path, "pre_ln", max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert _caption_ids(Blip2Engine.from_pretrained(str(tmp_path))) == expected


def test_fp16_storage_loads_into_fp32_and_fp16(tmp_path, checkpoints):
    _, hf = checkpoints("pre_ln")
    make_checkpoint(tmp_path, "pre_ln", dtype=torch.float16)
    engine = Blip2Engine.from_pretrained(str(tmp_path), dtype="float32")
    weight = engine.model.vision_model.encoder.layers[0].mlp.fc1.weight
    assert weight.dtype == torch.float32
    ref = hf.vision_model.encoder.layers[0].mlp.fc1.weight.to(torch.float16).float()
    torch.testing.assert_close(weight, ref, atol=0, rtol=0)
    half = Blip2Engine.from_pretrained(str(tmp_path), dtype="float16")
    assert half.model.language_model.lm_head.weight.dtype == torch.float16
    # As transformers' _keep_in_fp32_modules: the Q-Former and the queries stay fp32.
    assert half.model.qformer.layernorm.weight.dtype == torch.float32
    assert half.model.query_tokens.dtype == torch.float32


def _rewrite(src: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".json":
            (dst / f.name).write_text(f.read_text())
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_legacy_q_bias_v_bias(tmp_path, reference):
    root, expected = reference

    def split(state):
        for name in [n for n in state if n.endswith("self_attn.qkv.bias")]:
            q, _, v = state.pop(name).chunk(3)
            state[name.replace("qkv.bias", "q_bias")] = q.contiguous()
            state[name.replace("qkv.bias", "v_bias")] = v.contiguous()

    # The fused bias in our fixtures has a non-zero key part; legacy checkpoints have none.
    engine = Blip2Engine.from_pretrained(str(_rewrite(root, tmp_path / "legacy", split)))
    bias = engine.model.vision_model.encoder.layers[0].self_attn.qkv.bias
    assert torch.count_nonzero(bias.chunk(3)[1]) == 0
    assert torch.count_nonzero(bias.chunk(3)[0]) > 0


def test_explicit_untied_lm_head_is_used(tmp_path, reference):
    root, _ = reference
    config = json.loads((root / "config.json").read_text())

    def add_head(state):
        state["language_model.lm_head.weight"] = torch.zeros_like(
            state["language_model.model.decoder.embed_tokens.weight"]
        )

    dst = _rewrite(root, tmp_path / "head", add_head)
    config["text_config"]["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(config))
    engine = Blip2Engine.from_pretrained(str(dst))
    lm = engine.model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.model.decoder.embed_tokens.weight.data_ptr()
    assert torch.count_nonzero(lm.lm_head.weight) == 0


def test_missing_tensor_is_named(tmp_path, reference):
    root, _ = reference
    name = "language_model.model.decoder.layers.1.fc2.weight"
    dst = _rewrite(root, tmp_path / "missing", lambda s: s.pop(name))
    with pytest.raises(ValueError, match=r"missing .*layers\.1\.fc2\.weight"):
        Blip2Engine.from_pretrained(str(dst))


def test_missing_qkv_slice_is_named(tmp_path, reference):
    root, _ = reference
    name = "language_model.model.decoder.layers.0.self_attn.k_proj.bias"
    dst = _rewrite(root, tmp_path / "missing-k", lambda s: s.pop(name))
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.qkv_proj\.bias#1"):
        Blip2Engine.from_pretrained(str(dst))


def test_mismatched_shape_is_named(tmp_path, reference):
    root, _ = reference
    name = "qformer.encoder.layer.0.output_query.dense.weight"
    dst = _rewrite(root, tmp_path / "shape", lambda s: s.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=r"output_query\.dense\.weight.*\(3, 3\)"):
        Blip2Engine.from_pretrained(str(dst))


def test_pickle_only_directory_is_refused(tmp_path, reference):
    root, _ = reference
    for f in root.glob("*.json"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle"):
        Blip2Engine.from_pretrained(str(tmp_path))


def test_hub_id_downloads_only_safe_files(monkeypatch, reference):
    root, expected = reference
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(root)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    engine = Blip2Engine.from_pretrained("Salesforce/blip2-opt-2.7b")
    assert calls["repo_id"] == "Salesforce/blip2-opt-2.7b"
    assert not any(p.endswith((".bin", ".pt", ".pth", "*")) for p in calls["allow_patterns"])
    assert "*.safetensors" in calls["allow_patterns"]
    assert _caption_ids(engine) == expected


def test_weight_map_fuses_opt_qkv():
    assert loader.map_name("language_model.model.decoder.layers.3.self_attn.k_proj.weight") == (
        "language_model.model.decoder.layers.3.self_attn.qkv_proj.weight",
        1,
        3,
    )
    assert loader.map_name("vision_model.encoder.layers.2.self_attn.v_bias") == (
        "vision_model.encoder.layers.2.self_attn.qkv.bias",
        2,
        3,
    )
    assert loader.map_name("qformer.layernorm.weight") == ("qformer.layernorm.weight", 0, 1)


def test_tiny_random_is_deterministic():
    a = Blip2Engine.from_pretrained("tiny-random")
    b = Blip2Engine.from_pretrained("tiny-random")
    pixels = torch.zeros(3, 224, 224)
    assert a.generate([pixels])[0].token_ids == b.generate([pixels])[0].token_ids
    assert a.tokenizer.encode("a photo of a cat") == b.tokenizer.encode("a photo of a cat")
