"""
Stable Diffusion and FLUX VAE files, for kl_autoencoder.py (its model, whose weights these are): every published
family's config, FLUX.2's AutoencoderKLFlux2, the CompVis/LDM names of community .ckpt and .safetensors files (whole
SD checkpoints too), the latents diffusion models work on, tiles for large images, and float16 with a safety net.

    python sd_vae.py reconstruct --weights sdxl_vae.safetensors --preset sdxl --image in.png --out out.png --dtype fp16
    python sd_vae.py encode --weights ae.safetensors --preset flux --data images/ --resolution 1024 --out l.safetensors
    python sd_vae.py decode --weights ae.safetensors --preset flux --latents l.safetensors --out decoded/
    python sd_vae.py convert --weights v1-5.ckpt --export vae/diffusion_pytorch_model.safetensors
    python sd_vae.py convert --ckpt runs/kl/ckpt.pt --export-format ldm --export vae.safetensors   # ComfyUI, A1111
    python sd_vae.py train --weights flux2/vae --data images/ --resolution 512 --out runs/flux2  # kl_autoencoder.py's
    python sd_vae.py eval --ckpt runs/flux2/ckpt.pt                        # train and eval, with every family's files

--weights takes a diffusers folder (its config.json is read; its .safetensors, or the .bin of older diffusers), a
.safetensors, .ckpt, .pt or .bin file in diffusers' or LDM's names, or a whole Stable Diffusion checkpoint (its
first_stage_model.* keys); a pickle is read with weights_only=True, so a file that would run code is refused.
--preset or --config give the architecture of a file.
"""

import argparse
import copy
import json
import math
import os
import pickle
import re
import sys
import time

import torch
import torch.nn as nn

import kl_autoencoder as kl
from kl_autoencoder import UserError

# -----------------------------------------------------------------------------
# the families: presets (numbers from each model's vae/config.json on the Hugging Face Hub), config.json, FLUX.2

PRESETS = {
    **kl.PRESETS,  # sd (1.x and 2.x), small, tiny
    # SDXL (stabilityai/stable-diffusion-xl-base-1.0): the same shapes, scaled by 0.13025; float16 overflows.
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
                 scaling_factor=0.13025, force_upcast=True),
    # SD3 (stabilityai/stable-diffusion-3-medium-diffusers): 16 latent channels, no quant convs, (z - 0.0609) * 1.5305.
    "sd3": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
    # FLUX.1 (black-forest-labs/FLUX.1-dev): the SD3 shapes, (z - 0.1159) * 0.3611.
    "flux": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    # FLUX.2 (black-forest-labs/FLUX.2-dev; diffusers' AutoencoderKLFlux2, whose defaults these are): 32 latent
    # channels, quant convs on; its diffusion latents: the mode patchified 2x2 and standardised by bn's statistics.
    "flux2": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32, sample_size=1024,
                  batch_norm_eps=1e-4),
}
SD_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")  # not FLUX.2's


class AutoencoderKLFlux2(kl.AutoencoderKL):
    """FLUX.2's VAE (diffusers' AutoencoderKLFlux2): the AutoencoderKL, its decoder of its own widths when
    decoder_block_out_channels is given (a narrower "small decoder"), and `bn`, the running statistics of its latents
    patchified patch_size, by which its diffusion model's latents are standardised (to_diffusion_latents). Never
    applied in encode() or decode(), and left as it is by training (as diffusers does)."""

    def __init__(self, latent_channels=32, sample_size=1024, decoder_block_out_channels=None, batch_norm_eps=1e-4,
                 batch_norm_momentum=0.1, patch_size=(2, 2), **config):
        super().__init__(latent_channels=latent_channels, sample_size=sample_size, **config)
        (ph, pw), c = patch_size, self.config
        levels = len(c["block_out_channels"])
        if min(ph, pw) < 1 or decoder_block_out_channels and len(decoder_block_out_channels) != levels:
            raise ValueError(f"decoder_block_out_channels {decoder_block_out_channels} (one width per level) or "
                             f"patch_size {patch_size} (two sides of at least 1)")
        if decoder_block_out_channels:
            self.decoder = kl.Decoder(latent_channels, c["out_channels"], decoder_block_out_channels,
                                      c["layers_per_block"], c["norm_num_groups"], c["act_fn"],
                                      c["mid_block_add_attention"], [t.startswith("Attn") for t in c["up_block_types"]
                                                                     or ()])
        self.bn = nn.BatchNorm2d(ph * pw * latent_channels, batch_norm_eps, batch_norm_momentum, affine=False)
        self.config = {**{k: v for k, v in c.items() if k not in SD_KEYS}, "batch_norm_eps": batch_norm_eps,
                       "batch_norm_momentum": batch_norm_momentum, "patch_size": tuple(patch_size),
                       "decoder_block_out_channels": decoder_block_out_channels and tuple(decoder_block_out_channels)}


def model_class(config):
    """The class these keywords are for: FLUX.2's when they have its batch_norm_eps."""
    return AutoencoderKLFlux2 if "batch_norm_eps" in config else kl.AutoencoderKL


def read_config(path):
    """An AutoencoderKL or AutoencoderKLFlux2 config.json (or its folder) -> keywords, FLUX.2's over its defaults,
    checked (check_config)."""
    config = kl.read_config(path, families={"AutoencoderKL": {}, "AutoencoderKLFlux2": PRESETS["flux2"]})
    return check_config(config, path)


def check_config(config, source):
    """`config` if it builds a model (kl.build) whose latent convention is usable: the scaling factor (FLUX.2: the
    batch norm's eps) a finite number > 0, the shift finite, per-channel statistics finite numbers (stds > 0), one per
    latent channel; else one line."""
    full = kl.build(config, source, model_class(config), device="meta").config
    mean, std = (full.get(k) or (default,) * full["latent_channels"] for k, default in (("latents_mean", 0),
                                                                                        ("latents_std", 1)))
    positive = [full.get("scaling_factor", 1), full.get("batch_norm_eps", 1), *(std if isinstance(std, tuple) else ())]
    numbers = [*positive, full.get("shift_factor") or 0, *(mean if isinstance(mean, tuple) else ())]
    if not all(isinstance(v, tuple) and len(v) == full["latent_channels"] for v in (mean, std)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers) or \
            min(positive) <= 0:
        raise UserError(f"{source}: its latent convention (scaling_factor, shift_factor, latents_mean, latents_std; "
                        f"FLUX.2's batch_norm_eps) is not finite numbers, the scaling, stds and eps > 0, one statistic "
                        f"per latent channel")
    return config

# -----------------------------------------------------------------------------
# LDM's names: the CompVis/LDM names of most community VAE files and of the VAE inside whole Stable Diffusion
# checkpoints, as rewrites of diffusers' names (decoder levels count the other way round there: up.{levels - 1 - i})

LDM_PREFIXES = ("first_stage_model.", "vae.")  # the VAE's keys inside a whole SD checkpoint
LDM_RULES = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample."),
    (r"^encoder\.down_blocks\.(\d+)\.attentions\.", r"encoder.down.\1.attn."),
    (r"^decoder\.up_blocks\.(\d+)\.attentions\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.attn."),
    (r"\.mid_block\.resnets\.(\d)\.", lambda m, n: f".mid.block_{int(m[1]) + 1}."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.(attn\.\d+|attn_1)\.group_norm\.", r".\1.norm."),
    (r"\.(attn\.\d+|attn_1)\.to_([qkv])\.", r".\1.\2."),
    (r"\.(attn\.\d+|attn_1)\.to_out\.0\.", r".\1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14
TRAINING_LEFTOVERS = ("loss.", "model_ema.loss", "model_ema.decay", "model_ema.num_updates")  # LDM's EMA copies the
# loss's parameters too


def ldm_names(model):
    """{diffusers name: LDM name} for every weight of the model (which may be on the meta device)."""
    levels, table = len(model.config["block_out_channels"]), {}
    for name in model.state_dict():
        table[name] = name
        for pattern, new in LDM_RULES:
            rule = new if isinstance(new, str) else lambda m, new=new: new(m, levels)
            table[name] = re.sub(pattern, rule, table[name])
    return table


def is_attention_matrix(name):
    """A weight that diffusers keeps as a Linear's [C, C] and LDM as a 1x1 convolution's [C, C, 1, 1]."""
    return name.endswith(".weight") and (".attentions." in name or ".attn_1." in name) and "norm" not in name


def to_ldm(state, model):
    """A diffusers-format state dict of the model in LDM names and shapes (what ComfyUI and A1111-style tools load)."""
    return {ldm: state[name][:, :, None, None] if is_attention_matrix(name) else state[name]
            for name, ldm in ldm_names(model).items()}


def vae_part(state, model, source, ema=False):
    """The VAE's weights in a file: the part under first_stage_model. or vae. of a whole SD checkpoint; without what
    LDM's training left in community VAE files and LDM's own (its loss's networks, loss.*, and the EMA's counters),
    which are ignored as A1111 does, with a line that says so; with ema, the EMA's copies of the weights instead
    (model_ema.*, LDM's names without their dots), else without them. Other keys stay, to be refused as unexpected."""
    prefix = next((p for p in LDM_PREFIXES if any(k.startswith(p) for k in state)), "")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [k for k in state if k.startswith(TRAINING_LEFTOVERS)]
    copies = [k for k in state if k.startswith("model_ema.") and k not in ignored]
    if ema and not copies:
        raise UserError(f"{source} holds no EMA weights (model_ema.*): leave out --ema")
    if ema:  # the EMA's name of each weight: LitEma's, model_ema. and the LDM name without its dots
        ldm = {"model_ema." + name.replace(".", ""): name for name in ldm_names(model).values()}
        state = {ldm.get(k, k): v for k, v in state.items() if k in copies}
    if ignored or copies:
        kinds = ", ".join(sorted({".".join(k.split(".")[:2]) for k in ignored}))
        print(f"{source}: " + (f"ignored {len(ignored)} tensors of its training ({kinds}); " if ignored else "")
              + f"loaded its {'EMA weights' if ema else 'weights'}"
              + (f", not the EMA's ({len(copies)} tensors; --ema loads them)" if copies and not ema else ""),
              file=sys.stderr)
    return {k: v for k, v in state.items() if k not in ignored and (ema or k not in copies)}


def diffusers_names(state, model):
    """A VAE's state dict in any of the names files use (LDM's, diffusers' older attention names) -> diffusers' names
    and shapes."""
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):  # LDM names
        diffusers_name = {ldm: name for name, ldm in ldm_names(model).items()}
        state = {diffusers_name.get(k, k): v for k, v in state.items()}
    converted = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION:
            name = ".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])
        if is_attention_matrix(name) and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]
        converted[name] = tensor
    return converted


def read_weights(path, model, ema=False):
    """The weights in a file, of any of its names, as the model's state dict (checked by kl.fit_weights): a diffusers
    folder or .safetensors file, or a PyTorch file (.ckpt, .pt, .bin) read with weights_only=True (tensors and plain
    containers: a file that would run code is refused), its "state_dict" when it is a training checkpoint's."""
    if os.path.isdir(path):  # a diffusers folder: its .safetensors, else the .bin of older diffusers
        safetensors = os.path.join(path, "diffusion_pytorch_model.safetensors")
        path = safetensors if os.path.exists(safetensors) else os.path.join(path, "diffusion_pytorch_model.bin")
    if path.endswith(".safetensors"):
        state = kl.load_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as e:
            raise UserError(f"{path} is not a .safetensors file, nor a PyTorch file of tensors only ({type(e).__name__}"
                            f": one that would run code is refused)")
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else None
        if not isinstance(state, dict):
            raise UserError(f"{path} holds no state dict (a dict of tensors)")
    state = {k: v for k, v in state.items() if torch.is_tensor(v)}
    return kl.fit_weights(diffusers_names(vae_part(state, model, path, ema), model), model, path)

# -----------------------------------------------------------------------------
# latents for diffusion models, and large images in tiles


def to_diffusion_latents(z, config, bn=None):
    """The latents a diffusion model works on: z_model = (z - shift_factor) * scaling_factor, or, where the config has
    per-channel latents_mean and latents_std, (z - latents_mean) * scaling_factor / latents_std (the conventions of
    diffusers' SD3/Flux and SDXL pipelines); for FLUX.2, given its model's bn, z patchified and standardised:
    (patchify(z) - bn.running_mean) / sqrt(bn.running_var + bn.eps) (diffusers' Flux2Pipeline)."""
    z = z if bn is None else patchify(z, config["patch_size"])
    mean, std, scale = latent_statistics(z, config, bn)
    return (z - mean) * scale / std


def from_diffusion_latents(z_model, config, bn=None):
    """The inverse of to_diffusion_latents: z = z_model * std / scaling_factor + mean (then unpatchified, for FLUX.2),
    what the decoder takes."""
    mean, std, scale = latent_statistics(z_model, config, bn)
    z = z_model * std / scale + mean
    return z if bn is None else unpatchify(z, config["patch_size"])


def latent_statistics(z, config, bn=None):
    """(mean, std, scale) of the latent convention, as tensors on z's device and dtype where they are per channel."""
    if bn is not None:
        mean, var = (t.to(z).view(1, -1, 1, 1) for t in (bn.running_mean, bn.running_var))
        return mean, torch.sqrt(var + bn.eps), 1.0
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        return (*(torch.tensor(config[k], dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                  for k in ("latents_mean", "latents_std")), config["scaling_factor"])
    return config.get("shift_factor") or 0.0, 1.0, config["scaling_factor"]


def patchify(z, patch):
    """(B, C, h, w) -> (B, C ph pw, h / ph, w / pw): each ph x pw patch of a channel becomes ph pw channels (FLUX.2)."""
    (b, c, h, w), (ph, pw) = z.shape, patch
    return z.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4).reshape(b, c * ph * pw, h // ph, w // pw)


def unpatchify(z, patch):
    """The inverse of patchify."""
    (b, c, h, w), (ph, pw) = z.shape, patch
    return z.reshape(b, c // (ph * pw), ph, pw, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (ph * pw), h * ph,
                                                                                           w * pw)


TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor
AUTO_TILE_PIXELS = 1024 * 1024  # --tile auto tiles images larger than this (see README for the memory it saves)


def tiled(fn, x, size, out_size):
    """fn on overlapping size x size tiles of x, the outputs (out_size x out_size for a whole tile) blended linearly
    over their overlap: diffusers' enable_tiling scheme, step for step, so that the result is the same. Tiles start
    every (1 - TILE_OVERLAP) size; each output fades in from its upper and left neighbours (already blended) over
    TILE_OVERLAP out_size rows and columns, then keeps its first out_size - that."""
    step, extent = int(size * (1 - TILE_OVERLAP)), int(out_size * TILE_OVERLAP)
    rows = [[fn(x[:, :, i:i + size, j:j + size]) for j in range(0, x.shape[3], step)]
            for i in range(0, x.shape[2], step)]
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                blend(rows[i - 1][j], tile, extent, dim=2)
            if j > 0:
                blend(row[j - 1], tile, extent, dim=3)
    keep = out_size - extent
    return torch.cat([torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3) for row in rows], dim=2)


def blend(a, b, extent, dim):
    """In place: b's first `extent` rows (dim 2) or columns (dim 3) = a's last ones * (1 - t) + b's * t, with
    t = 0, 1/extent, 2/extent, ... (capped at the smaller tile's size)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    t = (torch.arange(extent, dtype=b.dtype, device=b.device) / extent).view(-1, *[1] * (3 - dim))
    b.narrow(dim, 0, extent).mul_(t).add_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - t))


def tiled_encode(model, x):
    """The posterior q(z|x) from tiles of the config's sample_size (as diffusers' encode with enable_tiling); from the
    whole of x when it fits one tile."""
    size = model.config["sample_size"]
    if max(x.shape[2:]) <= size:
        return model.encode(x)
    return kl.DiagonalGaussianDistribution(tiled(lambda t: model.encode(t).parameters, x, size,
                                                 size // model.downsampling_factor))


def tiled_decode(model, z):
    """The image of z decoded in tiles of sample_size / f latent pixels (as diffusers), whole when it fits one."""
    size = model.config["sample_size"] // model.downsampling_factor
    return model.decode(z) if max(z.shape[2:]) <= size else tiled(model.decode, z, size, model.config["sample_size"])

# -----------------------------------------------------------------------------
# the model a command uses, in its device and precision


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pretrained(args):
    """(the autoencoder, in float32 on the CPU, and the checkpoint or None): --weights of any family and names (the
    architecture: --preset, --config, or a diffusers folder's config.json), or a train checkpoint's model."""
    if args.weights:
        config = kl.architecture(args, PRESETS, read_config)  # (read_config checks a config.json's convention)
        model = kl.build(config, args.config or args.weights, model_class(config))
        model.load_state_dict(read_weights(args.weights, model, args.ema))
        return model.eval(), None
    ckpt = kl.load_checkpoint(args.ckpt)
    if args.ema and not ckpt.get("ema"):
        raise UserError(f"{args.ckpt} has no EMA weights (train with --ema DECAY)")
    model = kl.build(ckpt["config"]["model"], args.ckpt, model_class(ckpt["config"]["model"]))
    model.load_state_dict(ckpt["ema"] if args.ema else ckpt["model"])
    return model.eval(), ckpt


def model_source(args):
    """train's model (kl_autoencoder.py's train_command): its class, its keywords, the weights to start from."""
    config = {**kl.architecture(args, PRESETS, read_config), **{k: tuple(v) if isinstance(v, list) else v for k in (
        "block_out_channels", "layers_per_block", "latent_channels") for v in [getattr(args, k)] if v}}
    model = kl.build(check_config(config, args.config or args.weights or "the model"), "the model", model_class(config),
                     device="meta")
    return type(model), model.config, read_weights(args.weights, model) if args.weights else None


def inference_setup(args, model):
    """(device, dtype) for reconstruct, encode and decode, with the model moved there (and its encoder and decoder
    compiled with --compile). float16 becomes float32 where the config says force_upcast (float16 overflows in that
    model: SDXL's); else the float32 weights are kept, for float32_if_it_overflows."""
    device, dtype = kl.get_device(args.device), DTYPES[args.dtype]
    if dtype == torch.float16 and model.config.get("force_upcast", True):
        print("--dtype fp16: this model's config says force_upcast (float16 overflows in it); running in fp32",
              file=sys.stderr)
        dtype = torch.float32
    model.float32_weights = model.state_dict() if dtype == torch.float16 else None  # the tensors .to() replaces
    model.to(device=device, dtype=dtype)
    if args.compile:  # compiled on their first call, again for each new input shape and dtype
        model.encoder.compile()
        model.decoder.compile()
    return device, dtype


def float32_if_it_overflows(model, run, what):
    """run(dtype) with the model in its dtype; where float16 gave NaN or infinite values, the model is moved to float32
    for the rest of the command and run repeated, with a line that says so, whatever force_upcast says (SDXL-like VAEs
    overflow in float16: the black images). run takes the dtype to cast its input to."""
    dtype = next(model.parameters()).dtype
    out = run(dtype)
    values = out.parameters if isinstance(out, kl.DiagonalGaussianDistribution) else out  # (a posterior: its moments)
    if dtype == torch.float16 and not torch.isfinite(values).all():
        print(f"--dtype fp16: {what} overflowed in float16 (NaN or infinite values); running in fp32 from here",
              file=sys.stderr)
        model.float().load_state_dict(model.float32_weights)
        out = run(torch.float32)
    return out


def use_tiles(args, pixels):
    """--tile on, or auto for images of strictly more than AUTO_TILE_PIXELS pixels."""
    return args.tile == "on" or (args.tile == "auto" and pixels > AUTO_TILE_PIXELS)


def finite(t, what):
    """t, if all its values are finite; else a one-line error (a flat one-colour image is no result)."""
    if not torch.isfinite(t).all():
        raise UserError(f"{what} hold NaN or infinite values" + ("; the weights overflow in this precision: try "
                                                                  "--dtype fp32" if t.dtype != torch.float32 else ""))
    return t


def encode(model, x, tile):
    """The posterior of x (float32 if float16 overflows), tiled when `tile`."""
    return float32_if_it_overflows(model, lambda d: (tiled_encode if tile else kl.AutoencoderKL.encode)(model, x.to(d)),
                                   "the encoder")


def decode(model, z, tile):
    """The image of z (float32 if float16 overflows), tiled when `tile`, checked finite."""
    return finite(float32_if_it_overflows(model, lambda d: (tiled_decode if tile else kl.AutoencoderKL.decode)(
        model, z.to(d)), "the decoder"), "the decoded pixels")

# -----------------------------------------------------------------------------
# the commands: reconstruct, encode, decode, convert (and kl_autoencoder.py's train and eval)


@torch.no_grad()
def reconstruct(args):
    """--image, encoded and decoded (the posterior mean; in tiles, in --dtype) -> --out; its latent's shape, PSNR."""
    model, _ = pretrained(args)
    f = model.downsampling_factor
    x = kl.decode_image(args.image, model.config["in_channels"])[None].float() / 127.5 - 1
    if x.shape[2] % f or x.shape[3] % f:
        raise UserError(f"{args.image} is {x.shape[2]}x{x.shape[3]} (height x width); this model needs sides that are "
                        f"multiples of {f}: crop or pad it")
    device, _ = inference_setup(args, model)
    tile, t0 = use_tiles(args, x.shape[2] * x.shape[3]), time.perf_counter()
    posterior = encode(model, x.to(device), tile)
    out = decode(model, posterior.mode(), tile)
    seconds = time.perf_counter() - t0
    kl.write_image(out[0], args.out)
    quality = kl.psnr((kl.to_uint8(out).float() / 255).cpu(), kl.to_uint8(x).float() / 255).item()
    tiles = ", tiled" if tile and max(x.shape[2:]) > model.config["sample_size"] else ""  # (larger than one tile)
    print(f"latent {list(posterior.mean.shape)} (B, C, H/{f}, W/{f}) | PSNR {quality:.2f} dB | {seconds:.3f} s on "
          f"{device} ({str(next(model.parameters()).dtype).split('.')[1]}{tiles}) | wrote {args.out}")
    return quality


@torch.no_grad()
def encode_command(args):
    """--data -> one safetensors file: `latents` = to_diffusion_latents(z) (z the posterior mean, or a sample with
    --sample), what a diffusion model trains on, and the posterior's `mean` and `logvar` (unscaled), all float32 (N, C,
    h, w); `labels` when the data has them; FLUX.2's bn statistics. Its metadata: the model's config (the convention
    used), how the latents were made, and the images' names in order."""
    model, _ = pretrained(args)
    if model.config["in_channels"] != 3:
        raise UserError(f"encode reads RGB images; this model takes {model.config['in_channels']} channels")
    resolution = args.resolution or model.config["sample_size"]
    f = model.downsampling_factor * (math.lcm(*model.config["patch_size"]) if "patch_size" in model.config else 1)
    if resolution % f:
        raise UserError(f"--resolution {resolution} is not a multiple of {f}, this model's downsampling factor (times "
                        f"its latents' patch size)")
    kl.lock_folder(os.path.dirname(os.path.abspath(args.out)))  # one encode at a time writes there
    images, labels = kl.load_images(args.data, resolution, args.data_root)
    bn = copy.deepcopy(getattr(model, "bn", None))  # FLUX.2's statistics, kept in float32
    device, _ = inference_setup(args, model)
    generator, parts = torch.Generator(device).manual_seed(args.seed), []
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=args.workers)
    for i, batch in enumerate(loader):
        posterior = encode(model, kl.to_model_input(batch, device), use_tiles(args, resolution ** 2))
        z = posterior.sample(generator) if args.sample else posterior.mode()
        z_model = finite(to_diffusion_latents(z.float(), model.config, bn), "the latents")  # (bn's negative var: NaN)
        parts.append([t.float().cpu() for t in (z_model, posterior.mean, posterior.logvar)])
        if (i + 1) * 10 // len(loader) > i * 10 // len(loader):  # a line per tenth of the work
            print(f"encoded {sum(len(p[0]) for p in parts):,}/{len(images):,} images", flush=True)
    tensors = {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(("latents", "mean", "logvar"))}
    if labels is not None:
        tensors["labels"] = labels
    if bn is not None:  # the statistics the latents were standardised with (decode takes them back with them)
        tensors.update({f"bn.{k}": getattr(bn, k).float() for k in ("running_mean", "running_var")})
    names = [os.path.relpath(f, args.data) for f in images.files] if isinstance(images, kl.ImageFiles) else None
    made = f"to_diffusion_latents of the posterior {'sample (seed %d)' % args.seed if args.sample else 'mean'}"
    kl.save_safetensors(tensors, args.out, metadata={"format": "pt", "latents": made, "resolution": resolution,
                                                     "config": json.dumps(kl.diffusers_config(model)),
                                                     "names": json.dumps(names)})
    print(f"encoded {len(images):,} images at {resolution}x{resolution} into {args.out}: latents "
          f"{list(tensors['latents'].shape)} = {made}")


@torch.no_grad()
def decode_command(args):
    """A file's `latents` (N, C, h, w), taken back with from_diffusion_latents (with the convention in its metadata
    where it has one, FLUX.2's statistics in it too, else the model's) and decoded -> OUT/<name>.png for each image
    name in it (000000.png, ... where the names are missing, not one per latent, or would leave OUT)."""
    tensors, meta = kl.load_safetensors(args.latents, metadata=True)
    model, _ = pretrained(args)
    bn, patch = copy.deepcopy(getattr(model, "bn", None)), math.prod(model.config.get("patch_size", (1,)))
    latents, channels = tensors.get("latents", torch.zeros(0)), model.config["latent_channels"] * patch
    if latents.ndim != 4 or 0 in latents.shape or latents.shape[1] != channels:
        raise UserError(f"{args.latents}: its 'latents' are {list(latents.shape)}, not (N, {channels}, h, w) for this "
                        f"model")
    latents = finite(latents.float(), f"{args.latents}: its latents")
    try:
        saved, names = json.loads(meta.get("config", "{}")), json.loads(meta.get("names", "null"))
        config = check_config({**model.config, **{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                                                 if k in SD_KEYS[:4]}}, f"{args.latents}'s metadata")
    except (ValueError, AttributeError):
        raise UserError(f"{args.latents}: its metadata 'config' or 'names' is not the JSON encode writes")
    if bn is not None and "bn.running_mean" in tensors:  # the statistics they were made with (a fine-tune's differ)
        if [tensors.get(f"bn.{k}", torch.zeros(0)).shape for k in ("running_mean", "running_var")] != [(channels,)] * 2:
            raise UserError(f"{args.latents}: its bn.running_mean and bn.running_var are not one number per channel")
        bn.running_mean.copy_(tensors["bn.running_mean"]), bn.running_var.copy_(tensors["bn.running_var"])
    stems = [os.path.normpath(os.path.splitext(n)[0]) for n in names] if isinstance(names, list) and all(
        isinstance(n, str) for n in names) else []
    if not (len(stems) == len(latents) == len({s.lower() for s in stems}) and all(  # one each, inside --out, that
            not os.path.isabs(s) and not s.startswith("..") and "\0" not in s  # the file system can name
            and max(len(os.fsencode(part)) for part in s.split(os.sep)) < 250 for s in stems)):
        stems = [f"{i:06d}" for i in range(len(latents))]  # (a.png and a.jpg would both become a.png)
    kl.lock_folder(args.out)  # one decode at a time writes there
    paths = [os.path.join(args.out, s + ".png") for s in stems]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists ({len(existing)} of the images): pass --overwrite, or another --out")
    device, _ = inference_setup(args, model)
    z = from_diffusion_latents(latents, config, bn)
    for i in range(0, len(z), args.batch_size):
        x = decode(model, z[i:i + args.batch_size].to(device), use_tiles(args, z.shape[2] * z.shape[3] * (
            model.downsampling_factor ** 2))).float()
        for image, path in zip(x, paths[i:i + args.batch_size]):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            kl.write_image(image, path)
    print(f"decoded {len(z):,} latents into {args.out}")


def convert(args):
    """The weights of --weights or --ckpt -> --export: diffusers' format (config.json beside), or one file in LDM's
    names with the config in its metadata (ldm: what ComfyUI, A1111-style tools and diffusers' from_single_file
    load)."""
    model = pretrained(args)[0]
    if args.export_format == "diffusers":
        return kl.export(model, args.export)
    kl.save_safetensors(to_ldm(model.state_dict(), model), args.export, metadata={
        "format": "pt", "config": json.dumps(kl.diffusers_config(model))})
    print(f"exported {args.export} (LDM names)")

# -----------------------------------------------------------------------------
# the command line


def parse_args(argv=None):
    p = kl.Parser(description="Stable Diffusion and FLUX VAE files: reconstruct, encode, decode, convert; "
                              "kl_autoencoder.py's train and eval for them.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=kl.Parser)
    files = "a .safetensors, .ckpt, .pt or .bin file in diffusers' or LDM's names (a whole SD checkpoint too)"
    kl.add_train_and_eval(sub, PRESETS, files)
    r, n, d, c = (sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
                  for name, text in (("reconstruct", "encode and decode one image"),
                                     ("encode", "images -> latents for diffusion training (one .safetensors)"),
                                     ("decode", "latents (a file of encode, or any with 'latents') -> images"),
                                     ("convert", "a weights file to diffusers' format, or LDM's")))
    for q in (r, n, d, c):
        kl.add_model_options(q, presets=PRESETS, files=files, ema="a --ckpt's, or a file's model_ema.* (LDM's)")
        q.add_argument("--overwrite", action="store_true", help="replace existing output files")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    for q in (r, n, d):
        q.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                       help="bf16 is for GPUs; fp16 runs in fp32 where the config says force_upcast (it overflows)")
        q.add_argument("--compile", action="store_true", help="torch.compile the encoder and the decoder themselves")
        q.add_argument("--tile", default="auto", choices=["auto", "on", "off"],
                       help=f"encode and decode in tiles of the config's sample_size, as diffusers' enable_tiling "
                            f"(auto: for images of more than {AUTO_TILE_PIXELS:,} pixels, 1024 x 1024)")
    r.add_argument("--image", required=True)
    r.add_argument("--out", required=True, help="where to write the reconstruction (.png, or .jpg)")
    n.add_argument("--data", required=True, help="a folder of images, an .npz file, or cifar10, mnist, celeba")
    n.add_argument("--data-root", default="./data", help="where torchvision datasets are kept")
    n.add_argument("--resolution", type=kl.positive_int, help="images are resized and centre-cropped to this square "
                                                               "(default: the config's sample_size)")
    n.add_argument("--out", required=True, help="the latents file (.safetensors)")
    n.add_argument("--sample", action="store_true", help="latents from a posterior sample (default: its mean)")
    n.add_argument("--seed", type=kl.seed, default=0, help="of the posterior samples")
    n.add_argument("--workers", type=kl.nonnegative_int, help="DataLoader workers (default: up to 4 for image files)")
    n.add_argument("--batch-size", type=kl.positive_int, default=8)
    d.add_argument("--latents", required=True, help="a .safetensors file with a 'latents' tensor (N, C, h, w)")
    d.add_argument("--out", required=True, help="a folder for the images (PNG)")
    d.add_argument("--batch-size", type=kl.positive_int, default=1)
    c.add_argument("--export", required=True, metavar="FILE", help="the .safetensors file")
    c.add_argument("--export-format", default="diffusers", choices=["diffusers", "ldm"],
                   help="diffusers: config.json beside FILE; ldm: one file in CompVis/LDM names (ComfyUI, A1111)")
    args = kl.settle(p.parse_args(argv), {"reconstruct": (".png", ".jpg", ".jpeg"), "encode": (".safetensors",)})
    if args.command == "encode":
        args.workers = kl.settled_workers(args)
    return args


def main(argv=None):
    commands = {"train": lambda a: kl.train_command(a, model_source), "eval": lambda a: kl.eval_command(a, pretrained),
                "reconstruct": reconstruct, "encode": encode_command, "decode": decode_command, "convert": convert}
    return kl.main(argv, parse_args, commands, "sd_vae.py")


if __name__ == "__main__":
    main()
