"""A tiny, randomly initialised FLUX-architecture pipeline, built offline and deterministically.

It has every component of FLUX.1 (the MMDiT transformer, a 16-channel VAE, CLIP and T5 text
encoders with their tokenizers, the flow-matching Euler scheduler with FLUX.1-dev's shift settings),
only ~1 MB of them. It produces noise-like images, which is what a demo and the test-suite need: the
real pipeline code path, end to end, with no weights to download. `save_tiny_lora` writes a random LoRA
that fits every tiny model (for per-request LoRAs).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

# FLUX.1-dev's scheduler settings (its scheduler_config.json).
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

_HIDDEN = 32  # text encoders' width; also the transformer's joint/pooled projection width

TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _HIDDEN,
    "pooled_projection_dim": _HIDDEN,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 4, 8),
}

# What `save_tiny_lora` adapts: every attention projection of the double-stream block (image and text
# streams) and of the single-stream block, and the single block's output projection. The usual targets of
# a FLUX LoRA, all present in every seed's tiny model.
TINY_LORA_TARGETS = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.attn.add_q_proj",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out",
    "single_transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.0.attn.to_k",
    "single_transformer_blocks.0.attn.to_v",
    "single_transformer_blocks.0.proj_out",
)


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2's bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    return sorted({chr(b) for b in printable} | {chr(256 + i) for i, _ in enumerate(extra)})


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    # Byte-level alphabet with no merges: every byte is a token, word ends carry "</w>".
    alphabet = _byte_level_alphabet()
    pieces = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=77,
    )


def _t5_tokenizer():
    from transformers import T5Tokenizer

    specials = ["<pad>", "</s>", "<unk>"]
    chars = "▁" + string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab = [(piece, 0.0) for piece in specials] + [(c, -1.0 - i * 0.01) for i, c in enumerate(chars)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(seed: int = 0):
    """The tiny pipeline in memory, identical for the same seed."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = _clip_tokenizer()
    t5_tokenizer = _t5_tokenizer()

    torch.manual_seed(seed)
    # diffusers' and transformers' classes are only partly typed.
    transformer: Any = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae: Any = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=_HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=_HIDDEN,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(  # type: ignore[call-arg]
            vocab_size=len(t5_tokenizer),
            d_model=_HIDDEN,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval(),
    )


def save_tiny_model(out_dir: Path | str, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a normal diffusers folder."""
    out = Path(out_dir)
    build_tiny_pipeline(seed).save_pretrained(out)
    return out


def tiny_lora_weights(rank: int = 4, seed: int = 0, strength: float = 0.5) -> dict[str, Any]:
    """A random LoRA for the tiny transformer, in the diffusers/PEFT key layout
    (`transformer.<module>.lora_A.weight` (rank × in), `...lora_B.weight` (out × rank), alpha = rank).

    Both factors are random (a trained LoRA's B starts at zero; here the image must change visibly):
    A ~ N(0, 1/in), B ~ N(0, strength²), so B·A moves each weight by about strength·√(rank/in), as much as
    the layer's own weights are (≈ 1/√(3·in)) or more. Identical for the same rank, seed and strength."""
    import torch

    if rank < 1:
        raise ValueError("rank must be at least 1")
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # the layer shapes only, no weights
        transformer: Any = FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for target in TINY_LORA_TARGETS:
        layer = transformer.get_submodule(target)
        down = torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5
        up = torch.randn(layer.out_features, rank, generator=generator) * strength
        weights[f"transformer.{target}.lora_A.weight"] = down.contiguous()
        weights[f"transformer.{target}.lora_B.weight"] = up.contiguous()
    return weights


def save_tiny_lora(out: Path | str, rank: int = 4, seed: int = 0, strength: float = 0.5) -> Path:
    """Write `tiny_lora_weights` as one `.safetensors` file: `out` itself when it ends in `.safetensors`,
    else `out/pytorch_lora_weights.safetensors` (diffusers' folder layout). Returns the file."""
    from safetensors.torch import save_file

    path = Path(out)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_lora_weights(rank, seed, strength), path, metadata={"format": "pt"})
    return path
