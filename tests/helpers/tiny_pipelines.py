"""Tiny random-initialised diffusers pipelines, saved with `save_pretrained` (no hub needed): a latent
UNet2DModel + AutoencoderKL (LDMPipeline) and a Stable-Diffusion-style UNet2DConditionModel + CLIP."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import torch


def tiny_vae(shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
        shift_factor=shift_factor,
    ).eval()


def tiny_unet2d(unet_class, size: int, channels: int):
    """The seeded two-level UNet2DModel (8, 16 channels, attention at the lower level) the tiny pipelines share."""
    torch.manual_seed(0)
    return unet_class(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


def save_latent_pipeline(directory: Path) -> Path:
    """LDMPipeline: an 8×8×4 latent UNet2DModel, a 16×16 RGB AutoencoderKL, a DDIM scheduler that does not clip."""
    from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel

    unet = tiny_unet2d(UNet2DModel, size=8, channels=4)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False)
    LDMPipeline(vqvae=tiny_vae(), unet=unet, scheduler=sched).save_pretrained(directory)
    return directory


def tiny_tokenizer(directory: Path):
    """A CLIP BPE tokenizer over single characters (no merges): built from files, nothing downloaded."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)


def tiny_clip_config(tok, **extra):
    """A one-layer CLIP text config of width 16 over the character tokenizer (`extra`: e.g. projection_dim)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok.get_vocab()),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def save_text2image_pipeline(directory: Path) -> Path:
    """StableDiffusionPipeline: a tiny UNet2DConditionModel (8×8×4 latents, cross-attention width 16), a tiny CLIP
    text encoder and character tokenizer, the tiny VAE, a DDIM scheduler configured as Stable Diffusion's."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = tiny_tokenizer(directory.parent / (directory.name + "_tok"))
    torch.manual_seed(0)
    text = CLIPTextModel(tiny_clip_config(tok)).eval()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    sched = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    return directory


def save_pixel_pipeline(directory: Path) -> Path:
    """DDPMPipeline: a 16×16 RGB UNet2DModel, v-prediction, cosine betas (as tests/models/test_loading.py)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = tiny_unet2d(UNet2DModel, size=16, channels=3)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(directory)
    return directory


def save_flow_pixel_pipeline(directory: Path, shift: float = 3.0) -> Path:
    """DDPMPipeline layout with a flow-matching scheduler: a 16×16 RGB UNet2DModel predicting the velocity at σ · T,
    FlowMatchEulerDiscreteScheduler (Stable Diffusion 3's shift 3)."""
    from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

    unet = tiny_unet2d(UNet2DModel, size=16, channels=3)
    DDPMPipeline(unet=unet, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift)).save_pretrained(directory)
    return directory


def _tiny_clip_with_projection(tok, seed: int):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(tiny_clip_config(tok, projection_dim=16)).eval()


def save_sd3_pipeline(directory: Path, sd35: bool = False) -> Path:
    """StableDiffusion3Pipeline: a one-block SD3Transformer2DModel (2 heads × 8 dims) on 8×8×4 latents, two tiny CLIP
    encoders with projection (width 16 each: pooled 32), a one-layer T5 (width 32), the character tokenizers, the
    tiny VAE and FlowMatchEulerDiscreteScheduler with SD3's shift 3. `sd35`: Stable Diffusion 3.5 medium's
    transformer features instead, two blocks, the first with its second (image-only) attention, RMS QK-norm."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = tiny_tokenizer(directory.parent / (directory.name + "_tok"))
    t5_tok = tiny_t5_tokenizer()
    t5 = tiny_t5(t5_tok)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        **({} if sd35 else {"num_layers": 1}),
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=8,
        **({"num_layers": 2, "dual_attention_layers": (0,), "qk_norm": "rms_norm"} if sd35 else {}),
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1),
        text_encoder=_tiny_clip_with_projection(tok, 0),
        tokenizer=tok,
        text_encoder_2=_tiny_clip_with_projection(tok, 1),
        tokenizer_2=tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(directory)
    return directory


def tiny_dit():
    """A class-conditional DiT (2 blocks, 2 heads × 8 dims, 2×2 patches) on 8×8×4 latents with learned sigma, the
    1,000-class label table (+ the null class DiTPipeline guides with)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()


def tiny_dit_recipe(**kw):
    """A `tmpq train --arch dit` recipe small enough for tests: 8x8 patches, one block of 2 heads x 8, batch 8."""
    from tmpq.models.train_config import TrainConfig

    base = dict(architecture="dit", batch_size=8, patch_size=8, transformer_layers=1, attention_heads=2, head_dim=8)
    return TrainConfig(**{**base, "warmup_steps": 1, "autocast": "off", **kw})


def train_tiny_dit(run_dir: Path) -> Path:
    """A DiT file from `tmpq train --arch dit`'s trainer: 2 steps of the tiny recipe on 16 seeded images, labels i mod
    10 (the loadable kind `builtin:fashion-dit` is, in a second)."""
    from tmpq.models.train import train_ddpm

    images = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return train_ddpm(images, run_dir, tiny_dit_recipe(steps=2), progress=False, labels=torch.arange(16) % 10)


def save_dit_pipeline(directory: Path) -> Path:
    """DiTPipeline: the tiny DiT, the tiny AutoencoderKL and a DDIM scheduler that does not clip."""
    from diffusers import DDIMScheduler, DiTPipeline

    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=sched, id2label={0: "cat", 1: "dog"}).save_pretrained(
        directory
    )
    return directory


def tiny_t5_tokenizer():
    """A T5 (unigram) tokenizer over single characters, built in memory: no sentencepiece, nothing downloaded."""
    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_t5(tok):
    """A one-layer T5 encoder of width 32 (2 heads × 8) over the character T5 tokenizer."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(
        T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0)
    ).eval()


def tiny_pixart():
    """A PixArtTransformer2DModel (2 blocks, 2 heads × 8 dims, 2×2 patches, learned sigma) on 8×8×4 latents,
    cross-attending to width-16 captions."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=16,
    ).eval()


def edited_copy(pipeline: Path, directory: Path, change: dict) -> Path:
    """A copy of a saved pipeline whose model_index.json has `change` merged in (a hand-edited or foreign layout)."""
    shutil.copytree(pipeline, directory)
    index = json.loads((directory / "model_index.json").read_text())
    (directory / "model_index.json").write_text(json.dumps(index | change))
    return directory


def save_pixart_pipeline(directory: Path, pipeline: str = "PixArtAlphaPipeline") -> Path:
    """PixArtAlphaPipeline (or PixArtSigmaPipeline): a tiny PixArtTransformer2DModel (2 blocks, 2 heads × 8 dims,
    2×2 patches, learned sigma) on 8×8×4 latents, a one-layer T5 encoder (width 16) with the character tokenizer,
    the tiny VAE, and a DDIM scheduler that does not clip."""
    import diffusers
    from diffusers import DDIMScheduler
    from transformers import T5Config, T5EncoderModel

    tok = tiny_t5_tokenizer()
    torch.manual_seed(0)
    text = T5EncoderModel(
        T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=0)
    ).eval()
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    pipe = getattr(diffusers, pipeline)(
        tokenizer=tok, text_encoder=text, vae=tiny_vae(), transformer=tiny_pixart(), scheduler=sched
    )
    pipe.save_pretrained(directory)
    return directory


def save_flux_pipeline(directory: Path, dev: bool = True) -> Path:
    """FluxPipeline: a FluxTransformer2DModel (one double and one single block, 2 heads × 8 dims) on 4-channel
    latents packed in 2×2 patches, a tiny CLIP (pooled width 16), a one-layer T5 (width 32), the character
    tokenizers and the tiny VAE (shift factor 0.1). `dev`: FLUX.1-dev's embedded guidance and its scheduler's
    resolution-dependent shift; otherwise FLUX.1-schnell's (no guidance, fixed shift 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tok = tiny_tokenizer(directory.parent / (directory.name + "_tok"))
    t5_tok = tiny_t5_tokenizer()
    torch.manual_seed(0)
    clip = CLIPTextModel(tiny_clip_config(tok)).eval()
    t5 = tiny_t5(t5_tok)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=dev,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    if dev:  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(shift_factor=0.1),
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)
    return directory


if __name__ == "__main__":  # python tests/helpers/tiny_pipelines.py OUT_DIR: the tiny pipelines of docs/models.md
    import sys

    out = Path(sys.argv[1])
    saves = {"pixel": save_pixel_pipeline, "latent": save_latent_pipeline, "t2i": save_text2image_pipeline}
    saves |= {"dit": save_dit_pipeline, "pixart": save_pixart_pipeline, "sd3": save_sd3_pipeline}
    saves |= {"flux": save_flux_pipeline}
    for name, save in saves.items():
        save(out / name)
    print(f"wrote {', '.join(f'{out}/{n}' for n in saves)}")
