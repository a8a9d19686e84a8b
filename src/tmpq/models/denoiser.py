"""One denoiser interface, `eps = denoiser(x_t, t)` (or `denoiser(x_t, t, cond)` when conditional), over the
model kinds tmpq accepts."""

from __future__ import annotations

import torch
from torch import nn

from tmpq.errors import TmpqError
from tmpq.sampling.conditioning import Conditioning


def _sample_shape(config) -> tuple[int, int, int]:
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, h, w)


class _DiffusersDenoiser(nn.Module):
    """What every diffusers UNet adapter shares: the sample shape, learned variance, and ε conversion.

    A model trained to predict x0 (`sample`) or v is converted to ε with its noise schedule, so the sampler,
    calibration and search see the same quantity whatever the model predicts; a flow-matching model's velocity
    stays a velocity (its sampler steps on it, see `FlowSchedule`). A model with learned variance
    (2× output channels) gives its first half (the mean prediction).
    """

    def __init__(self, unet: nn.Module, schedule, sample_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        if schedule is not None and schedule.prediction_type not in ("epsilon", "flow"):
            self.prediction_type = schedule.prediction_type
        else:
            self.prediction_type = "epsilon"
        self.sample_shape = sample_shape or _sample_shape(unet.config)
        self.learned_variance = unet.config.out_channels == 2 * unet.config.in_channels

    network_class = ""  # the diffusers class an adapter accepts (checked by _check_network)

    def _check_network(self, network: nn.Module) -> None:
        import diffusers

        if not isinstance(network, getattr(diffusers, self.network_class)):
            raise TmpqError(f"expected a diffusers {self.network_class}, got {type(network).__name__}")

    def _rows(self, x: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
        """The prompt rows of a text-conditioned adapter, on x's device and dtype."""
        if cond is None:
            raise TmpqError("this text-to-image denoiser needs prompts: call it as model(x, t, cond)")
        self._check(x)
        return cond.embeddings().to(device=x.device, dtype=x.dtype)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise TmpqError(
                f"input of shape {tuple(x.shape[1:])} does not match the model's {self.sample_shape}; "
                "resize or pad the images to the model's size"
            )

    def network_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is conditioned on: the integer timestep, or σ · T on a flow-matching schedule."""
        if self.schedule is not None and self.schedule.prediction_type == "flow":
            return self.schedule.model_timestep(t)
        return t

    @staticmethod
    def _doubled(uncond: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, t: torch.Tensor):
        """Classifier-free guidance's one pass on both halves: the rows [negative prompt; prompt] and x, t twice."""
        rows = torch.cat([uncond.to(rows.dtype).expand(len(x), -1, -1), rows])
        return rows, torch.cat([x, x]), torch.cat([t, t])

    @staticmethod
    def _guided(out: torch.Tensor, g: float) -> torch.Tensor:
        """ε∅ + g · (ε_c − ε∅) from the output of the doubled batch [negative prompt; prompt]."""
        out_u, out_c = out.chunk(2)
        return out_u + g * (out_c - out_u)

    def _to_epsilon(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.learned_variance:
            out = out[:, : x.shape[1]]
        if self.prediction_type != "epsilon":
            out = self.schedule.to_epsilon(out, x, t)
        return out


class _PromptGuided(_DiffusersDenoiser):
    """What the text-conditioned adapters share: the network class check, and the negative-prompt row and guidance
    scale g as buffers (so they belong to the fingerprint and travel with an export)."""

    def __init__(self, network: nn.Module, schedule, uncond: torch.Tensor, guidance_scale: float) -> None:
        self._check_network(network)
        if guidance_scale < 1.0:
            raise TmpqError(f"guidance scale must be >= 1 (1: no guidance), got {guidance_scale}")
        super().__init__(network, schedule)
        self.register_buffer("uncond", uncond.detach().reshape(1, *uncond.shape[-2:]).clone())
        self.register_buffer("guidance_scale", torch.tensor(float(guidance_scale)))


class UNetDenoiser(_DiffusersDenoiser):
    """Adapts a diffusers UNet2DModel (returns an output object) to a plain epsilon callable."""

    def __init__(self, unet: nn.Module, schedule=None) -> None:
        from diffusers import UNet2DModel

        if not isinstance(unet, UNet2DModel):
            raise TmpqError(
                f"expected a diffusers UNet2DModel, got {type(unet).__name__}; tmpq supports UNet2DModel and "
                "UNet2DConditionModel pipelines, tmpq-trained UNets and `module:factory` denoisers"
            )
        super().__init__(unet, schedule)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self._to_epsilon(self.unet(x, self.network_timestep(t)).sample, x, t)


class GuidedDenoiser(_PromptGuided):
    """A text-conditioned diffusers UNet2DConditionModel with classifier-free guidance.

    ε = ε(x, ∅) + g · (ε(x, c) − ε(x, ∅)), as diffusers' StableDiffusionPipeline computes it: one UNet pass on
    the doubled batch [unconditional; conditional]. The unconditional embedding (the empty prompt) and g are
    buffers, so they belong to the model's fingerprint and travel with an export; the prompt embeddings arrive
    per batch in `cond`. Calibration therefore sees both halves of the batch, as deployment will.
    """

    network_class = "UNet2DConditionModel"

    def __init__(self, unet: nn.Module, schedule, uncond: torch.Tensor, guidance_scale: float = 7.5) -> None:
        super().__init__(unet, schedule, uncond, guidance_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        emb = self._rows(x, cond)
        g = float(self.guidance_scale)
        if g == 1.0:
            out = self.unet(x, self.network_timestep(t), encoder_hidden_states=emb).sample
        else:
            rows, x2, t2 = self._doubled(self.uncond, emb, x, t)
            out = self._guided(self.unet(x2, self.network_timestep(t2), encoder_hidden_states=rows).sample, g)
        return self._to_epsilon(out, x, t)


class ClassDenoiser(_DiffusersDenoiser):
    """A class-conditional diffusers DiT (`DiTTransformer2DModel`) with classifier-free guidance, as DiTPipeline
    runs it: one pass on the doubled batch [conditional; null class], ε = ε(x, ∅) + g · (ε(x, c) − ε(x, ∅)) on the
    first `in_channels` outputs (the rest is the learned variance, which DDIM does not use).

    The class labels arrive per batch in `cond` (a `Conditioning` whose table holds label ids); the null label and g
    are buffers, so they belong to the fingerprint and travel with an export."""

    def __init__(self, transformer: nn.Module, schedule, guidance_scale: float = 4.0) -> None:
        from diffusers import DiTTransformer2DModel

        if not isinstance(transformer, DiTTransformer2DModel):
            raise TmpqError(f"expected a diffusers DiTTransformer2DModel, got {type(transformer).__name__}")
        if guidance_scale < 1.0:
            raise TmpqError(f"guidance scale must be >= 1 (1: no guidance), got {guidance_scale}")
        super().__init__(transformer, schedule)
        classes = transformer.config.num_embeds_ada_norm
        self.num_classes = int(classes)
        self.register_buffer("null_label", torch.tensor(self.num_classes))  # DiTPipeline's null class: the last id
        self.register_buffer("guidance_scale", torch.tensor(float(guidance_scale)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        if cond is None:
            raise TmpqError("this class-conditional denoiser needs class labels: call it as model(x, t, cond)")
        self._check(x)
        labels = cond.embeddings().to(device=x.device, dtype=torch.long).reshape(-1)
        g = float(self.guidance_scale)
        if g == 1.0:
            out = self.unet(x, timestep=self.network_timestep(t), class_labels=labels).sample
        else:
            null = self.null_label.expand(len(x))
            tt = self.network_timestep(torch.cat([t, t]))
            both = self.unet(torch.cat([x, x]), timestep=tt, class_labels=torch.cat([labels, null]))
            eps = both.sample[:, : x.shape[1]]
            out_c, out_u = eps.chunk(2)
            out = out_u + g * (out_c - out_u)
        return self._to_epsilon(out, x, t)


class PixArtDenoiser(_PromptGuided):
    """A text-conditioned diffusers PixArt transformer (`PixArtTransformer2DModel`, PixArt-α/Σ) with classifier-free
    guidance, as PixArtAlphaPipeline runs it: one pass on the doubled batch [negative prompt; prompt] with each
    prompt's attention mask, ε = ε(x, ∅) + g · (ε(x, c) − ε(x, ∅)) on the first `in_channels` outputs (the rest is
    the learned variance).

    Prompt rows (from `MaskedTextEncoder`) hold the T5 embedding with the attention mask as the last channel. The
    negative-prompt row, g and the image resolution (PixArt-α 1024's micro-conditions) are buffers, so they belong
    to the fingerprint and travel with an export."""

    network_class = "PixArtTransformer2DModel"

    def __init__(
        self, transformer: nn.Module, schedule, uncond: torch.Tensor, guidance_scale: float, image_size: tuple[int, int]
    ) -> None:
        super().__init__(transformer, schedule, uncond, guidance_scale)
        self.register_buffer("resolution", torch.tensor([float(image_size[0]), float(image_size[1])]))

    def _added_cond(self, n: int, dtype: torch.dtype) -> dict:
        """PixArt-α 1024 (sample_size 128) is conditioned on the image's pixel height, width and aspect ratio."""
        if not getattr(self.unet, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        res = self.resolution.to(dtype).expand(n, 2)
        return {"resolution": res, "aspect_ratio": (res[:, :1] / res[:, 1:])}

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        rows = self._rows(x, cond)
        g = float(self.guidance_scale)
        x2, t2 = x, t
        if g != 1.0:
            rows, x2, t2 = self._doubled(self.uncond, rows, x, t)
        out = self.unet(
            x2,
            encoder_hidden_states=rows[..., :-1],
            encoder_attention_mask=rows[..., -1],
            timestep=self.network_timestep(t2),
            added_cond_kwargs=self._added_cond(len(x2), x2.dtype),
        ).sample
        if g != 1.0:
            out = self._guided(out, g)
        return self._to_epsilon(out, x, t)


class SD3Denoiser(_PromptGuided):
    """Stable Diffusion 3's `SD3Transformer2DModel` with classifier-free guidance as StableDiffusion3Pipeline runs it:
    one pass on the doubled batch [negative prompt; prompt], v = v(x, ∅) + g · (v(x, c) − v(x, ∅)), at σ · T of its
    flow-matching schedule.

    Prompt rows (from `SD3TextEncoder`) hold the joint text embeddings and, as the last row, the pooled projection;
    the negative-prompt row and g are buffers, so they belong to the fingerprint and travel with an export."""

    network_class = "SD3Transformer2DModel"

    def __init__(self, transformer: nn.Module, schedule, uncond: torch.Tensor, guidance_scale: float = 7.0) -> None:
        super().__init__(transformer, schedule, uncond, guidance_scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        rows = self._rows(x, cond)
        g = float(self.guidance_scale)
        x2, t2 = x, t
        if g != 1.0:
            rows, x2, t2 = self._doubled(self.uncond, rows, x, t)
        cfg = self.unet.config
        out = self.unet(
            hidden_states=x2,
            timestep=self.network_timestep(t2),
            encoder_hidden_states=rows[:, :-1, : cfg.joint_attention_dim],
            pooled_projections=rows[:, -1, : cfg.pooled_projection_dim],
        ).sample
        if g != 1.0:
            out = self._guided(out, g)
        return self._to_epsilon(out, x, t)


class FluxDenoiser(_DiffusersDenoiser):
    """A FLUX transformer (`FluxTransformer2DModel`) as FluxPipeline runs it: the (C, H, W) latents packed into 2×2
    patches of tokens with their position ids, the T5 embeddings and the pooled CLIP vector, the timestep σ, and
    (FLUX.1-dev) the embedded guidance scale. The velocity comes back unpacked.

    FluxPipeline's "true" classifier-free guidance (`true_cfg_scale` > 1 with a negative prompt) is on when
    `true_cfg_scale` > 1: then `uncond` (the encoded negative prompt) is required and v = v(x, ∅) + s · (v(x, c) −
    v(x, ∅)), both passes with the same embedded guidance, in one doubled batch. Off (1, the pipeline's default),
    no negative-prompt pass is made and no buffer is added, so such a model's fingerprint is what it was before.

    Prompt rows (from `FluxTextEncoder`) hold the T5 embeddings and, as the last row, the pooled CLIP vector. The
    embedded guidance g, the latent size and (with true guidance) its scale and negative-prompt row are buffers, so
    they belong to the fingerprint and travel with an export. The sampler's (C, H, W) noise packed is the pipeline's
    own noise, so both sample the same images."""

    network_class = "FluxTransformer2DModel"

    def __init__(
        self,
        transformer: nn.Module,
        schedule,
        guidance_scale: float,
        latent_size: tuple[int, int],
        uncond: torch.Tensor | None = None,
        true_cfg_scale: float = 1.0,
    ) -> None:
        self._check_network(transformer)
        h, w = (int(v) for v in latent_size)
        if h < 2 or w < 2 or h % 2 or w % 2:
            raise TmpqError(f"FLUX latents are packed in 2x2 patches: their size must be even, got {h}x{w}")
        if not guidance_scale >= 0:
            raise TmpqError(f"FLUX's embedded guidance scale must be >= 0, got {guidance_scale}")
        if not true_cfg_scale >= 1.0:
            raise TmpqError(
                f"FLUX's true CFG scale must be >= 1 (1: off, FluxPipeline's default), got {true_cfg_scale}"
            )
        if true_cfg_scale > 1.0 and uncond is None:
            raise TmpqError("FLUX's true CFG needs the encoded negative prompt (uncond)")
        super().__init__(transformer, schedule, (transformer.config.in_channels // 4, h, w))
        self.register_buffer("guidance_scale", torch.tensor(float(guidance_scale)))
        if true_cfg_scale > 1.0:
            self.register_buffer("true_cfg_scale", torch.tensor(float(true_cfg_scale)))
            self.register_buffer("uncond", uncond.detach().reshape(1, *uncond.shape[-2:]).clone())
        self.register_buffer("latent_size", torch.tensor([h, w]))
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        self.img_ids: torch.Tensor  # FluxPipeline's latent image ids (not saved: a function of the latent size)
        self.register_buffer("img_ids", ids.reshape(-1, 3), persistent=False)

    def network_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """FluxPipeline passes the scheduler's timestep / 1000, i.e. σ for the usual T = 1000."""
        return self.schedule.model_timestep(t) / 1000

    @property
    def true_cfg(self) -> float:
        """FluxPipeline's true CFG scale this denoiser applies (1.0: off)."""
        s = getattr(self, "true_cfg_scale", None)
        return 1.0 if s is None else float(s)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None = None) -> torch.Tensor:
        rows = self._rows(x, cond)
        s = self.true_cfg
        xs, ts = x, t
        if s != 1.0:
            rows, xs, ts = self._doubled(self.uncond, rows, x, t)
        b, c, h, w = xs.shape
        packed = xs.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        cfg = self.unet.config
        emb = rows[:, :-1, : cfg.joint_attention_dim]
        guidance = self.guidance_scale.float().expand(b) if cfg.guidance_embeds else None
        out = self.unet(
            hidden_states=packed,
            timestep=self.network_timestep(ts).to(x.dtype),
            guidance=guidance,
            pooled_projections=rows[:, -1, : cfg.pooled_projection_dim],
            encoder_hidden_states=emb,
            txt_ids=torch.zeros(emb.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=self.img_ids.to(x.dtype),
        ).sample
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        if s != 1.0:
            out = self._guided(out, s)
        return self._to_epsilon(out, x, t)
