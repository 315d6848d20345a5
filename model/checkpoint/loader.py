"""Load official Hugging Face BLIP-2 and BLIP checkpoints (safetensors only) into our modules.

Every checkpoint tensor goes through one mapping table, `WEIGHT_MAP`, from its Hugging Face name to a
parameter here (and a slice of it, for fused projections). Tensors are read one at a time and copied
straight into parameters already allocated in the target dtype and device, so no full fp32 copy of the
model is ever held. Anything missing or of the wrong shape is an error that names the tensor.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..arch.blip import BlipForConditionalGeneration, BlipForQuestionAnswering
from ..arch.blip2 import Blip2ForConditionalGeneration
from ..arch.retrieval import Blip2ForImageTextRetrieval, BlipForImageTextRetrieval
from .config import Blip2Config, BlipConfig, architecture, read_config

log = logging.getLogger(__name__)

# Files fetched from the hub: configs, weights, tokenizer. Pickle (`*.bin`, `*.pt`) is never fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json"]


@dataclass(frozen=True)
class Rule:
    """Checkpoint names matching `pattern` fill `target` (a `re.sub` template); with `parts` > 1,
    the tensor is slice `part` of `parts` equal slices of the target along dim 0."""

    pattern: str
    target: str
    part: int = 0
    parts: int = 1


_LAYER = r"language_model\.model\.decoder\.layers\.(\d+)\.self_attn"
_VIT = r"vision_model\.encoder\.layers\.(\d+)\.self_attn"

WEIGHT_MAP: tuple[Rule, ...] = (
    # OPT: q, k, v fused into one projection (one GEMM per layer instead of three).
    Rule(
        rf"{_LAYER}\.q_proj\.(weight|bias)",
        r"language_model.model.decoder.layers.\1.self_attn.qkv_proj.\2",
        0,
        3,
    ),
    Rule(
        rf"{_LAYER}\.k_proj\.(weight|bias)",
        r"language_model.model.decoder.layers.\1.self_attn.qkv_proj.\2",
        1,
        3,
    ),
    Rule(
        rf"{_LAYER}\.v_proj\.(weight|bias)",
        r"language_model.model.decoder.layers.\1.self_attn.qkv_proj.\2",
        2,
        3,
    ),
    # Older ViT checkpoints store the qkv bias as two halves; the key part of the fused bias is zero.
    Rule(rf"{_VIT}\.q_bias", r"vision_model.encoder.layers.\1.self_attn.qkv.bias", 0, 3),
    Rule(rf"{_VIT}\.v_bias", r"vision_model.encoder.layers.\1.self_attn.qkv.bias", 2, 3),
    # BLIP's output bias is stored under both names (tied in transformers); one parameter here.
    Rule(r"(.*)cls\.predictions\.decoder\.bias", r"\1cls.predictions.bias"),
    # Everything else keeps its Hugging Face name.
    Rule(r"(.+)", r"\1"),
)

# Checkpoint tensors known to be unused where the model has no such parameter: the Q-Former's text
# branch (generation models), buffers.
IGNORED = re.compile(
    r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.|qformer\.embeddings\.|.*\.position_ids$"
    # T5: the stacks' embeddings are `shared`; the first cross-attention has no relative bias.
    r"|language_model\.(encoder|decoder)\.embed_tokens\.weight$"
    r"|language_model\.decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"
)
# Parameter slices that may be absent from the checkpoint and are zero (the ViT key bias).
ZERO_IF_ABSENT = re.compile(r"vision_model\.encoder\.layers\.\d+\.self_attn\.qkv\.bias#1")


def map_name(name: str) -> tuple[str, int, int]:
    """Hugging Face tensor name -> (our parameter name, slice index, number of slices)."""
    for rule in WEIGHT_MAP:
        if re.fullmatch(rule.pattern, name):
            return re.sub(rule.pattern, rule.target, name), rule.part, rule.parts
    raise AssertionError("the catch-all rule matches every name")  # pragma: no cover


def resolve_checkpoint(model_id: str, revision: str | None = None) -> Path:
    """A local directory, or a hub id fetched (configs, safetensors and tokenizer files only)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_id, revision=revision, allow_patterns=HUB_PATTERNS))


def weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [root / s for s in shards]
    single = root / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(root.glob("*.safetensors"))
    if found:
        return found
    pickles = [p.name for p in root.glob("*.bin")]
    hint = f" (found pickle files {pickles}, which are never loaded)" if pickles else ""
    raise FileNotFoundError(f"no *.safetensors weights in {root}{hint}")


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "Blip2ForConditionalGeneration": Blip2ForConditionalGeneration,
    "BlipForConditionalGeneration": BlipForConditionalGeneration,
    "BlipForQuestionAnswering": BlipForQuestionAnswering,
    "Blip2ForImageTextRetrieval": Blip2ForImageTextRetrieval,
    "BlipForImageTextRetrieval": BlipForImageTextRetrieval,
}


def model_class(cfg: Blip2Config | BlipConfig) -> type[nn.Module]:
    """The class `config.json`'s `architectures` names (a BLIP-2 generator when it names none)."""
    name = architecture(cfg)
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is not supported (supported: {sorted(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def build_empty(
    cfg: Blip2Config | BlipConfig, dtype: torch.dtype, device: torch.device, decode_attention: str = "sdpa"
) -> nn.Module:
    """Allocate the model in place (no init work, no fp32 staging) in `dtype`, except the parameters a
    float16 model keeps in float32 (`keep_in_float32`); `decode_attention`: "sdpa" or "triton" (BLIP-2
    OPT only, see `model.kernels.backend`)."""
    extra = {"decode_attention": decode_attention} if decode_attention != "sdpa" else {}
    with torch.device("meta"):
        model = model_class(cfg)(cfg, **extra)
    model.to(dtype)
    if dtype == torch.float16:
        keep_in_float32(model)
    return model.to_empty(device=device).eval().requires_grad_(False)


def keep_in_float32(model: nn.Module) -> list[str]:
    """Turn the parameters the model's `keep_in_fp32` patterns name (full matches) to float32; return
    their names. As transformers' `_keep_in_fp32_modules`, which it applies to float16 only (bfloat16 has
    float32's range): BLIP-2's Q-Former and learned queries, T5's feed-forward `wo` (its output passes
    fp16's 65504 in Flan-T5). BLIP keeps nothing in float32."""
    patterns = [re.compile(p) for p in getattr(model, "keep_in_fp32", ())]
    kept = []
    for name, param in model.named_parameters():
        if any(p.fullmatch(name) for p in patterns):
            param.data = param.data.float()
            kept.append(name)
    return kept


def tied_weights(model: nn.Module) -> dict[str, str]:
    """Output projections tied to input embeddings, which tied checkpoints omit: target -> source."""
    cfg = model.cfg
    if isinstance(model, (Blip2ForImageTextRetrieval, BlipForImageTextRetrieval)):
        return {}
    if isinstance(cfg, BlipConfig):
        return {
            "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight"
        }
    if not cfg.text.tie_word_embeddings:
        return {}
    # OPT (and original T5) tie the output projection to the input embeddings.
    embed = (
        "language_model.shared.weight"
        if cfg.is_encoder_decoder
        else ("language_model.model.decoder.embed_tokens.weight")
    )
    return {"language_model.lm_head.weight": embed}


def _copy_into(param: torch.Tensor, tensor: torch.Tensor, name: str, part: int, parts: int) -> None:
    target = param.chunk(parts, dim=0)[part] if parts > 1 else param
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
        )
    target.copy_(tensor)


def load_weights(model: nn.Module, files: list[Path]) -> None:
    params = dict(model.named_parameters())
    filled: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                target, part, parts = map_name(name)
                if target not in params:
                    if IGNORED.match(name):
                        continue  # known to be unused by this model
                    unexpected.append(name)
                    continue
                _copy_into(params[target], f.get_tensor(name), name, part, parts)
                filled.add(f"{target}#{part}" if parts > 1 else target)
    _finish(model, params, filled)
    if unexpected:
        log.warning("ignored %d checkpoint tensors with no parameter: %s", len(unexpected), unexpected[:8])


def _finish(model: nn.Module, params: dict[str, torch.Tensor], filled: set[str]) -> None:
    for target, source in tied_weights(model).items():
        if target not in filled and target in params:
            module_name, _, attr = target.rpartition(".")
            setattr(model.get_submodule(module_name), attr, params[source])
            filled.add(target)
    missing = []
    for name, param in params.items():
        if name in filled:
            continue
        fused = name.endswith(("qkv_proj.weight", "qkv_proj.bias", "qkv.bias"))
        for part in range(3) if fused else [None]:
            key = name if part is None else f"{name}#{part}"
            if key in filled:
                continue
            if part is not None and ZERO_IF_ABSENT.fullmatch(key):
                param.chunk(3, dim=0)[part].zero_()
            else:
                missing.append(key)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


def load_model(
    root: Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    decode_attention: str = "auto",
) -> nn.Module:
    """The checkpoint in `root`, built with its decode attention backend: `decode_attention` "auto" (the
    Triton kernels where they pass their self-checks on this device, else SDPA), "sdpa" or "triton"
    (`model.kernels.backend.choose_decode_attention`)."""
    from ..kernels.backend import choose_decode_attention

    cfg = read_config(root / "config.json")
    device = torch.device(device)
    backend = choose_decode_attention(cfg, dtype, device, decode_attention)
    model = build_empty(cfg, dtype, device, backend)
    load_weights(model, weight_files(root))
    return model
