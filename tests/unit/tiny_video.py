"""Tiny text/image-to-video diffusers pipelines built from config objects (no download).

The component configs follow diffusers' own pipeline tests (tests/pipelines/{ltx,ltx2,wan,
cogvideo}); the tokenizer is a character-level vocabulary written here, the T5 encoder is
built from a config with the tiny-random-t5 sizes (d_model 32), and LTX-2's Gemma 3
encoder from a tiny Gemma3Config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

T5_DIM = 32
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!-'"

# backend -> (t2v class, i2v class)
BACKENDS: dict[str, tuple[str, str]] = {
    "ltx": ("LTXPipeline", "LTXImageToVideoPipeline"),
    "ltx2": ("LTX2Pipeline", "LTX2ImageToVideoPipeline"),
    "wan": ("WanPipeline", "WanImageToVideoPipeline"),
    "cogvideox": ("CogVideoXPipeline", "CogVideoXImageToVideoPipeline"),
}


def tiny_t5_tokenizer(max_length: int = 16) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def tiny_t5_encoder(vocab_size: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size,
        d_model=T5_DIM,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(cfg).eval()


def _ltx_components() -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=T5_DIM,
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    tok = tiny_t5_tokenizer()
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": tiny_t5_encoder(len(tok)),
        "tokenizer": tok,
    }


def _wan_components(i2v: bool) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(0)
    extra: dict[str, Any] = {"image_dim": 4} if i2v else {}
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36 if i2v else 16,
        out_channels=16,
        text_dim=T5_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **extra,
    )
    tok = tiny_t5_tokenizer()
    out: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
        "text_encoder": tiny_t5_encoder(len(tok)),
        "tokenizer": tok,
        "transformer_2": None,
    }
    if i2v:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        torch.manual_seed(0)
        out["image_encoder"] = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=4,
                projection_dim=4,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=1,
            )
        )
        out["image_processor"] = CLIPImageProcessor(crop_size=32, size=32)
    return out


def _cogvideox_components(i2v: bool) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel, DDIMScheduler

    torch.manual_seed(0)
    common: dict[str, Any] = {
        "time_embed_dim": 2,
        "text_embed_dim": T5_DIM,
        "num_layers": 1,
        "sample_width": 2,
        "sample_height": 2,
        "sample_frames": 9,
        "patch_size": 2,
        "temporal_compression_ratio": 4,
        "max_text_seq_length": 16,
        "out_channels": 4,
    }
    if i2v:
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=8,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
            **common,
        )
    else:
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, **common
        )
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    tok = tiny_t5_tokenizer()
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": DDIMScheduler(),
        "text_encoder": tiny_t5_encoder(len(tok)).eval(),
        "tokenizer": tok,
    }


def _ltx2_components() -> dict[str, Any]:
    """LTX-2 (video + audio) with a tiny Gemma 3 text encoder built from a config."""
    import torch
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tok = tiny_t5_tokenizer()
    hidden, layers = 32, 2
    torch.manual_seed(0)
    text_encoder = Gemma3ForConditionalGeneration(
        Gemma3Config(
            text_config=Gemma3TextConfig(
                vocab_size=len(tok),
                hidden_size=hidden,
                intermediate_size=32,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=64,
                sliding_window=16,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=1,
            ),
            vision_config=SiglipVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            image_token_index=len(tok) - 1,
            boi_token_index=len(tok) - 2,
            eoi_token_index=len(tok) - 3,
        )
    ).eval()
    torch.manual_seed(0)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=hidden,
        rope_double_precision=False,
        rope_type="split",
    )
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=hidden,
        text_proj_in_factor=layers + 1,
        video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(0)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    torch.manual_seed(0)
    vocoder = LTX2Vocoder(
        in_channels=2 * 8,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "audio_vae": audio_vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": tok,
        "connectors": connectors,
        "vocoder": vocoder,
        "processor": None,
        "prompt_enhancer": None,
        "duration_head": None,
    }


def build_tiny_video_pipeline(directory: Path, backend: str, mode: str = "t2v") -> Path:
    """Save a tiny `backend` (ltx, ltx2, wan, cogvideox) pipeline for `mode` (t2v, i2v) under
    `directory/<backend>-<mode>` and return that folder."""
    import diffusers

    if backend not in BACKENDS or mode not in ("t2v", "i2v"):
        raise ValueError(f"unknown tiny pipeline {backend}/{mode}")
    i2v = mode == "i2v"
    if backend == "ltx":
        components = _ltx_components()
    elif backend == "ltx2":
        components = _ltx2_components()
    elif backend == "wan":
        components = _wan_components(i2v)
    else:
        components = _cogvideox_components(i2v)
    cls = getattr(diffusers, BACKENDS[backend][1 if i2v else 0])
    pipe = cls(**components)
    out = Path(directory) / f"{backend}-{mode}"
    pipe.save_pretrained(str(out))
    return out
