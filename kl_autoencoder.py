"""
The KL autoencoder of Stable Diffusion (Rombach et al. 2022, "kl-f8"), in one file, to be read top
to bottom. The architecture is that of diffusers' AutoencoderKL, and the weights are interchangeable:
a diffusers state dict loads here with strict=True, key for key; so do the CompVis/LDM-named files of
the Stable Diffusion world (a whole SD checkpoint too), and any diffusers AutoencoderKL config.json.

    python kl_autoencoder.py reconstruct --weights vae.safetensors --preset sd --image in.png --out out.png
    python kl_autoencoder.py encode --weights sdxl_vae.safetensors --preset sdxl --data images/ --out lat.safetensors
    python kl_autoencoder.py decode --weights sdxl_vae.safetensors --preset sdxl --latents lat.safetensors --out dec/
    python kl_autoencoder.py convert --weights v1-5.ckpt --export vae/diffusion_pytorch_model.safetensors
    python kl_autoencoder.py train --data images/ --preset sd --resolution 256 --out runs/kl
    torchrun --nproc_per_node 8 kl_autoencoder.py train --data images/ ...    # one process per GPU
    python kl_autoencoder.py eval --ckpt runs/kl/ckpt.pt --fid --export vae/diffusion_pytorch_model.safetensors
    python kl_autoencoder.py train --help                                     # every option

An image x (values in [-1, 1]) is encoded to a diagonal Gaussian posterior q(z|x) over a latent
with `latent_channels` channels and 1/f of the image's height and width (f = 2^(levels - 1), 8 for
SD); decoding z (the posterior mean, or a sample) gives the reconstruction x_rec. Diffusion models
work on z * scaling_factor, a number chosen so that the scaled latents have unit standard deviation.

THE OBJECTIVE (LDM's; sums over pixels and latent elements, means over the batch), one step:

    autoencoder    loss = nll + kl_weight * KL(q(z|x) || N(0, I)) + disc_weight * lambda * g
                   nll  = sum_pixels (|x - x_rec| + perceptual_weight * LPIPS(x, x_rec)) / exp(s) + s
                   g    = -mean D(x_rec),   lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4),  L = decoder.conv_out
    discriminator  d    = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))

with x_rec the decoding of a sample z ~ q(z|x), s a scalar log-variance (learned with --learn-logvar,
the default; LDM's code leaves it at 0), D a PatchGAN discriminator and both adversarial terms off
before --disc-start. With terms averaged over elements instead of summed, the same balance needs
kl_weight * N_latent / N_pixels (1e-6 -> about 2.08e-8 at 256 x 256, f = 8, 4 latent channels).

The file:
    Part I, the autoencoder and its objective: read this part to learn the model
        model           the modules in the order an image meets them, AutoencoderKL, the posterior
        loss            reconstruction, NLL, perceptual, discriminator, hinge, adaptive weight, autoencoder_loss
        training step   Config, LDM's recipe; train_step, the autoencoder's step, its EMA, the discriminator's
        metrics         PSNR, SSIM, Frechet distance, evaluate
    Part II, running it
        images and data, pretrained networks (VGG16, LPIPS, Inception), weights I/O (safetensors, LDM names,
        configs, export), latents for diffusion models and tiles, distributed training and exact resume,
        the training run, the command line, commands and main
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import pickle
import re
import signal
import struct
import sys
import tempfile
import time
import types
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
class UserError(Exception):
    """A mistake in how the program was called: main() prints it as one line and exits with 2."""

# =============================================================================
# PART I: the autoencoder and its objective
# =============================================================================

# -----------------------------------------------------------------------------
# model: the modules, in the order an image meets them, named as diffusers names them


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu, "mish": F.mish}  # config's act_fn


class ResnetBlock(nn.Module):
    """x + conv2(act(norm2(conv1(act(norm1(x)))))), with a 1x1 conv_shortcut on x when the number of
    channels changes (diffusers' ResnetBlock2D without time embedding; act is SiLU in every published VAE)."""

    def __init__(self, in_channels, out_channels, groups, act_fn="silu"):
        super().__init__()
        self.act = ACTIVATIONS[act_fn]
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Halve height and width: pad right and bottom by one, then a 3x3 convolution of stride 2."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double height and width: nearest-neighbour upsampling, then a 3x3 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, head size = channels:
    x + to_out(softmax(q k^T / sqrt(C)) v), with q, k, v = to_q, to_k, to_v(group_norm(x))."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' key: to_out.0

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """One resolution of the encoder or decoder: residual blocks, then an optional resampler
    (diffusers' DownEncoderBlock2D / UpDecoderBlock2D; the key is downsamplers.0 or upsamplers.0)."""

    def __init__(self, in_channels, out_channels, n_blocks, groups, act_fn, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
                                      for i in range(n_blocks)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(out_channels)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Residual block, attention, residual block, at the lowest resolution (the attention left out when
    the config says mid_block_add_attention: false). The attention is registered first, as in diffusers'
    UNetMidBlock2D, so the state dict lists it first."""

    def __init__(self, channels, groups, act_fn, attention=True):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, act_fn) for _ in range(2)])

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, in, H, W) -> (B, 2 * latent, H/f, W/f): conv_in, levels of `layers_per_block` residual
    blocks with a downsampler on all but the last, mid block, GroupNorm, SiLU, conv_out."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, act_fn="silu",
                 mid_attention=True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        channels = [block_out_channels[0], *block_out_channels]
        last = len(block_out_channels) - 1
        self.down_blocks = nn.ModuleList([
            Level(channels[i], channels[i + 1], layers_per_block, groups=groups, act_fn=act_fn,
                  resample=None if i == last else "down")
            for i in range(len(block_out_channels))])
        self.mid_block = MidBlock(block_out_channels[-1], groups, act_fn, mid_attention)
        self.conv_norm_out = group_norm(block_out_channels[-1], groups)
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """z (B, latent, h, w) -> (B, out, f h, f w): conv_in, mid block, levels in reverse with
    `layers_per_block + 1` residual blocks and an upsampler on all but the last, GroupNorm, SiLU, conv_out."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups, act_fn="silu",
                 mid_attention=True):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        last = len(rev) - 1  # up_blocks before mid_block: diffusers' state dict lists them first
        self.up_blocks = nn.ModuleList([
            Level(rev[max(i - 1, 0)], rev[i], layers_per_block + 1, groups=groups, act_fn=act_fn,
                  resample=None if i == last else "up")
            for i in range(len(rev))])
        self.mid_block = MidBlock(rev[0], groups, act_fn, mid_attention)
        self.conv_norm_out = group_norm(block_out_channels[0], groups)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussianDistribution:
    """q(z|x) = N(mean, diag exp(logvar)), from the encoder's 2 * latent channels (mean first).

    logvar is clamped to [-30, 20] as in LDM and diffusers. kl() and nll() return nats per example,
    summed over channels, height and width: shape (B,).
    """

    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """z = mean + std * eps, eps ~ N(0, I) (drawn on the generator's device when one is given)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        """The most likely z: the mean."""
        return self.mean

    def kl(self, other=None):
        """KL(self || other) = 1/2 sum ((mean - mean_o)^2 / var_o + var / var_o - 1 - logvar + logvar_o),
        and with other = None the prior N(0, I): 1/2 sum (mean^2 + var - 1 - logvar), with var - 1 computed
        as expm1(logvar) so that each term stays >= 0 in floating point near logvar = 0."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + torch.expm1(self.logvar) - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, x, dims=(1, 2, 3)):
        """-log N(x; mean, diag var) = 1/2 sum (log 2 pi + logvar + (x - mean)^2 / var)."""
        return 0.5 * torch.sum(math.log(2 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var, dim=list(dims))


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> q(z|x);  z -> post_quant_conv -> Decoder. Keyword names and defaults as in
    diffusers' config.json (except the SD-sized defaults). The last six keywords describe how the model is
    used, not the model: sample_size is the tile size of tiled encoding; scaling_factor, shift_factor,
    latents_mean, latents_std the latent convention of diffusion models (to_diffusion_latents, Part II);
    force_upcast that float16 overflows in this model. They are kept, and exported, never applied here."""

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, act_fn="silu", mid_block_add_attention=True,
                 use_quant_conv=True, use_post_quant_conv=True, sample_size=512, scaling_factor=0.18215,
                 shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                           latent_channels=latent_channels, norm_num_groups=norm_num_groups, act_fn=act_fn,
                           mid_block_add_attention=mid_block_add_attention, use_quant_conv=use_quant_conv,
                           use_post_quant_conv=use_post_quant_conv, sample_size=sample_size,
                           scaling_factor=scaling_factor, shift_factor=shift_factor,
                           latents_mean=None if latents_mean is None else tuple(latents_mean),
                           latents_std=None if latents_std is None else tuple(latents_std), force_upcast=force_upcast)
        shape = (block_out_channels, layers_per_block, norm_num_groups, act_fn, mid_block_add_attention)
        self.encoder = Encoder(in_channels, latent_channels, *shape)
        self.decoder = Decoder(latent_channels, out_channels, *shape)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    @property
    def downsampling_factor(self):
        return 2 ** (len(self.config["block_out_channels"]) - 1)

    def encode(self, x):
        """x (B, in, H, W) in [-1, 1] -> the posterior q(z|x)."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z):
        """z (B, latent, h, w) -> image (B, out, f h, f w)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x, sample_posterior=False, generator=None):
        """The reconstruction of x: the decoded posterior mean, or a decoded sample."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())


PRESETS = {  # the published VAE families; numbers from each model's vae/config.json on the Hugging Face Hub
    # Stable Diffusion 1.x / 2.x (CompVis kl-f8): 83,653,863 parameters; 4 latent channels, scaled by 0.18215.
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
               scaling_factor=0.18215),
    # SDXL (stabilityai/stable-diffusion-xl-base-1.0): the same shapes, scaled by 0.13025; float16 overflows.
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
                 scaling_factor=0.13025, force_upcast=True),
    # SD3 (stabilityai/stable-diffusion-3-medium-diffusers): 16 latent channels, no quant convs, (z - 0.0609) * 1.5305.
    "sd3": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
                use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609),
    # FLUX.1 (black-forest-labs/FLUX.1-dev): the SD3 shapes, (z - 0.1159) * 0.3611.
    "flux": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
                 use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159),
    # small ones for CPUs and tests
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=1, latent_channels=4, sample_size=256),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=256),
}


def build(preset, **overrides):
    """The AutoencoderKL of a named preset, with keyword overrides."""
    return AutoencoderKL(**{**PRESETS[preset], **overrides})

# -----------------------------------------------------------------------------
# loss: the terms of THE OBJECTIVE, then the objective itself (autoencoder_loss)


def reconstruction_loss(x, x_rec, kind="l1"):
    """Per element: |x - x_rec| (L1) or (x - x_rec)^2 (MSE), in the [-1, 1] image units."""
    return (x - x_rec).abs() if kind == "l1" else (x - x_rec).pow(2)


def nll_loss(rec, logvar):
    """LDM's negative log-likelihood with one scalar log-variance s (a Laplace or Gaussian scale,
    up to constants): sum over pixels of rec / exp(s) + s, averaged over the batch. rec: (B, C, H, W)
    per-element reconstruction (+ perceptual) loss."""
    return (rec / torch.exp(logvar) + logvar).sum() / rec.shape[0]


VGG_SLICES = (4, 9, 16, 23, 30)  # torchvision vgg16().features[:i] ends at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG_CHANNELS = (64, 128, 256, 512, 512)


class Perceptual(nn.Module):
    """LPIPS-style perceptual distance (Zhang et al. 2018), per image:

        d(x, y) = sum_l mean_hw sum_c w_lc (f_lchw(x) / n_lhw(x) - f_lchw(y) / n_lhw(y))^2,
        n_lhw = sqrt(sum_c f_lchw^2 + eps),

    with f_l the VGG16 features at relu1_2 ... relu5_3 of the input scaled as LPIPS scales it, and
    w_l >= 0 one weight per channel: all 1 by default, or the calibrated "lin" weights of the LPIPS
    project (load_lpips_weights). eps sits inside the square root, so an all-zero feature vector
    gives a finite gradient (LPIPS adds it outside, which gives NaN there). The VGG is frozen; the
    distance still has gradients with respect to both images."""

    def __init__(self, vgg_features):
        super().__init__()
        bounds = (0, *VGG_SLICES)
        self.slices = nn.ModuleList([vgg_features[a:b] for a, b in zip(bounds, bounds[1:])])
        self.weights = nn.ParameterList([nn.Parameter(torch.ones(c), requires_grad=False) for c in VGG_CHANNELS])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def forward(self, x, y, eps=1e-10):
        """x, y: (B, 3, H, W) in [-1, 1] -> (B,)."""
        h = torch.cat([x, y]).sub(self.shift).div(self.scale)
        total = 0
        for block, w in zip(self.slices, self.weights):
            h = block(h)
            f = h / torch.sqrt(h.float().pow(2).sum(1, keepdim=True) + eps)
            fx, fy = f.chunk(2)
            total = total + ((fx - fy).pow(2) * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
        return total


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017) as in taming-transformers and LDM: a grid of
    real/fake logits, one per overlapping patch. Conv(4x4, stride 2) + LeakyReLU(0.2), then
    n_layers Conv(4x4, stride 2, 2, 1) + BatchNorm + LeakyReLU with 2x, 4x, 8x the channels,
    then Conv(4x4) to one channel. Weights N(0, 0.02), BatchNorm scales N(1, 0.02).
    2,765,633 parameters for 3 input channels."""

    def __init__(self, in_channels=3, ndf=64, n_layers=3):
        super().__init__()
        layers, mult = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)], 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        self.main = nn.Sequential(*layers, nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    """The discriminator's hinge loss: 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_loss(logits_fake):
    """The autoencoder's adversarial loss: -mean D(x_rec)."""
    return -logits_fake.mean()


def adaptive_weight(nll, g_loss, last_layer, max_weight=1e4):
    """LDM's balance of the adversarial term (Esser et al. 2021): lambda = ||grad_L nll|| /
    (||grad_L g|| + 1e-4), clamped to [0, 1e4], with L the decoder's last layer; no gradient
    flows through lambda. Stays on the device (no host sync)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def autoencoder_loss(x, x_rec, kl, logvar, rec_loss="l1", perceptual=None, perceptual_weight=1.0, kl_weight=1e-6,
                     disc=None, disc_weight=0.5, last_layer=None):
    """THE OBJECTIVE of the autoencoder, for one batch (nats-like units: sums over elements, means over the batch):

        loss = nll + kl_weight * mean_b KL_b + disc_weight * lambda * g,
        nll  = sum_pixels (rec + perceptual_weight * perceptual) / exp(logvar) + logvar, averaged over the batch,

    x, x_rec: (B, C, H, W) in [-1, 1], x_rec decoded from a posterior sample; kl: (B,) nats per image;
    rec = reconstruction_loss per element; perceptual: one LPIPS distance per image, added to every pixel of
    that image as LDM adds it (off when `perceptual` is None). The adversarial term is on when `disc` is given
    (from --disc-start on): g = generator_loss(D(x_rec)), lambda = adaptive_weight at `last_layer`
    (decoder.conv_out.weight). Returns (loss, terms): terms holds loss, rec, perceptual, nll, kl, g and lambda
    (means over the batch, detached, float32: the log's columns)."""
    rec = reconstruction_loss(x, x_rec.float(), rec_loss)
    p_loss = perceptual(x, x_rec).float() if perceptual is not None else rec.new_zeros(len(x))
    nll = nll_loss(rec + perceptual_weight * p_loss.view(-1, 1, 1, 1), logvar)
    loss = nll + kl_weight * kl.mean()
    g = lam = torch.zeros((), device=x.device)
    if disc is not None:
        g = generator_loss(disc(x_rec).float())
        lam = adaptive_weight(nll, g, last_layer)
        loss = loss + disc_weight * lam * g
    terms = {"loss": loss, "rec": rec.mean(), "perceptual": p_loss.mean(), "nll": nll, "kl": kl.mean(), "g": g,
             "lambda": lam}
    return loss, {name: value.detach().float() for name, value in terms.items()}

# -----------------------------------------------------------------------------
# one training step


def knob(default, help, **option):
    """A field of Config: its default, and the help (and any choices or metavar) of its train option."""
    return dataclasses.field(default=default, metadata={"help": help, **option})


@dataclasses.dataclass
class Config:
    """LDM's training recipe (configs/autoencoder/autoencoder_kl_*.yaml and LPIPSWithDiscriminator): the objective's
    weights and both optimizers' settings. Each field is a train option of the same name, with this help."""
    rec_loss: str = knob("l1", "the per-pixel reconstruction loss (LDM: l1)", choices=("l1", "mse"))
    perceptual_weight: float = knob(1.0, "weight of the LPIPS-style VGG16 distance (LDM: 1; 0: off)")
    kl_weight: float = knob(1e-6, "weight of the KL summed over latent elements (LDM: 1e-6)")
    learn_logvar: bool = knob(True, "learn the NLL's scalar log-variance s (LDM's code leaves it at 0)")
    disc_weight: float = knob(0.5, "weight of the adversarial term (LDM: 0.5; 0: no discriminator)")
    disc_start: int = knob(50001, "the step from which the discriminator trains and judges (LDM: 50001)")
    lr: float = knob(1e-4, "learning rate of both optimizers (LDM: 4.5e-6 x GPUs x batch size)")
    betas: tuple = knob((0.5, 0.9), "Adam's betas, both optimizers (LDM)", metavar=("BETA1", "BETA2"))
    weight_decay: float = knob(0.0, "the autoencoder's AdamW weight decay (LDM: 0, Adam)")
    grad_clip: float = knob(0.0, "max gradient norm of the autoencoder (0: off)")
    ema: float = knob(0.0, "decay of a moving average of the weights, e.g. 0.999 (0: none)", metavar="DECAY")
    precision: str = knob("fp32", "autocast dtype (train and eval: bf16 on CUDA)", choices=("bf16", "fp32"))


class Trainable(nn.Module):
    """What the autoencoder's optimizer trains, and what DistributedDataParallel wraps: the
    autoencoder and the scalar log-variance s of the NLL (a parameter, frozen at 0 with
    --no-learn-logvar as in LDM's code, which never hands it to its optimizer)."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        """x -> (reconstruction of a posterior sample, KL to N(0, I) per example)."""
        posterior = self.autoencoder.encode(x)
        return self.autoencoder.decode(posterior.sample()), posterior.kl()


def train_step(model, disc, x, step, *, opt, opt_d, cfg, perceptual=None, ema=None):
    """One step of THE OBJECTIVE on a batch x with the recipe cfg (a Config): the autoencoder's optimizer step (then
    its EMA), and from cfg.disc_start on the discriminator's. model: a Trainable, or DistributedDataParallel around
    one; in several processes the discriminator's gradients are averaged and its statistics shared here.
    Returns the terms of autoencoder_loss and the discriminator's loss d, on the device (no host sync)."""
    raw_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    disc_on = cfg.disc_weight > 0 and step >= cfg.disc_start
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    # the autoencoder: decode a posterior sample, the objective (the discriminator frozen while it judges), a step
    with autocast:
        x_rec, kl = model(x)
        disc.requires_grad_(False)
        loss, terms = autoencoder_loss(
            x, x_rec, kl, raw_model.logvar, rec_loss=cfg.rec_loss, perceptual=perceptual,
            perceptual_weight=cfg.perceptual_weight, kl_weight=cfg.kl_weight, disc=disc if disc_on else None,
            disc_weight=cfg.disc_weight, last_layer=raw_model.autoencoder.decoder.conv_out.weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
    opt.step()
    if ema is not None:  # ema <- decay * ema + (1 - decay) * weights
        torch._foreach_lerp_(list(ema.parameters()), list(raw_model.autoencoder.parameters()), 1 - cfg.ema)
    # the discriminator: the hinge loss on the real images and the (detached) reconstructions, a step
    terms["d"] = torch.zeros((), device=x.device)
    if disc_on:
        disc.requires_grad_(True)
        with autocast:
            d = hinge_d_loss(disc(x.detach()).float(), disc(x_rec.detach()).float())
        opt_d.zero_grad(set_to_none=True)
        d.backward()
        if dist.is_initialized():  # the discriminator is not in DDP: average its gradients over the processes
            for p in disc.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(dist.get_world_size())
        opt_d.step()
        if dist.is_initialized() and x.device.type != "cuda":  # rank 0's BatchNorm statistics (CUDA: SyncBatchNorm)
            for b in disc.buffers():
                dist.broadcast(b, 0)
        terms["d"] = d.detach().float()
    return terms

# -----------------------------------------------------------------------------
# metrics


def to_uint8(x):
    """[-1, 1] -> uint8 [0, 255], rounded: what an image file holds."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def psnr(x, y):
    """Peak signal-to-noise ratio in dB per image, for values in [0, 1]: 10 log10(1 / MSE),
    the MSE taken over channels, height and width. x, y: (B, C, H, W) -> (B,); inf when equal."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)


def ssim(x, y, window=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004) per image, for values in [0, 1]:

        SSIM = mean over positions and channels of
               (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

    with local means, variances and covariance under a Gaussian window (11 x 11, sigma 1.5) at
    every position where it fits (no padding), C1 = 0.01^2, C2 = 0.03^2. (B, C, H, W) -> (B,)."""
    c = x.shape[1]
    g = torch.exp(-(torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2) ** 2
                  / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)
    x, y = x.float(), y.float()
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2}), between N(mu1, S1) and N(mu2, S2).

    Tr((S1 S2)^{1/2}) is the sum of the square roots of the eigenvalues of S1^{1/2} S2 S1^{1/2},
    a symmetric positive semi-definite matrix with the same spectrum as S1 S2; both steps use
    symmetric eigendecompositions in float64, so the result is real and finite even for singular
    covariances (fewer samples than dimensions). Units of the features squared; returns a float.
    """
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    sqrt1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = sqrt1 @ sigma2 @ sqrt1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(d2.item(), 0.0)  # d^2 >= 0; a negative value is float rounding


@torch.no_grad()
def evaluate(autoencoder, batches, precision="fp32", features=None):
    """The record of an evaluation on held-out batches x (B, 3, H, W) in [-1, 1]: the mean PSNR (dB) and
    SSIM of the decoded posterior means against the inputs (both as 8-bit images), the mean KL per image
    (nats), the standard deviation of posterior samples z over all images and elements, the scaling factor
    1 / std it implies (how SD's 0.18215 was chosen; these three in float32 even under bf16) and, with a
    `features` network (images in [0, 1] -> (B, D)), rFID: the Frechet distance between the features of
    the inputs and of the reconstructions. Seeded: the same numbers every time, global random state untouched."""
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # psnr, ssim, kl, sum z, sum z^2
    n = n_latent = 0
    feats = {"real": [], "fake": []}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    generator = torch.Generator(device).manual_seed(0)
    for x in batches:
        with autocast:
            posterior = DiagonalGaussianDistribution(autoencoder.encode(x).parameters.float())  # statistics in fp32
            x_rec = autoencoder.decode(posterior.mode()).float()
        z = posterior.sample(generator).double()
        real, fake = to_uint8(x).float() / 255, to_uint8(x_rec).float() / 255
        totals += torch.stack([psnr(fake, real).double().sum(), ssim(fake, real).double().sum(),
                               posterior.kl().double().sum(), z.sum(), z.pow(2).sum()])
        n, n_latent = n + len(x), n_latent + z.numel()
        if features is not None:
            feats["real"].append(features(real))
            feats["fake"].append(features(fake))
    counts = torch.tensor([n, n, n, n_latent, n_latent], device=device)
    psnr_mean, ssim_mean, kl_mean, z_mean, z2_mean = (totals / counts).tolist()
    std = math.sqrt(max(z2_mean - z_mean ** 2, 0.0))
    record = {"images": n, "psnr": psnr_mean, "ssim": ssim_mean, "kl": kl_mean, "latent_std": std,
              "scaling_factor": 1 / std}
    if features is not None:
        stats = []
        for f in (torch.cat(feats["real"]), torch.cat(feats["fake"])):
            stats += [f.mean(0), torch.cov(f.T)]
        record["rfid"] = frechet_distance(*stats)
    return record

# =============================================================================
# PART II: running it
# =============================================================================

# -----------------------------------------------------------------------------
# images and data: image files, and image sets for training and evaluation as uint8 (3, r, r) tensors


def decode_image(path, channels=3):
    """An image file of any depth and mode (8 or 16 bits; grey, RGB, RGBA, palette) -> uint8 (channels, H, W),
    the same way in every command: colours mixed up or down to `channels`, alpha dropped, 16 bits rounded to 8."""
    mode = torchvision.io.ImageReadMode.RGB if channels == 3 else torchvision.io.ImageReadMode.GRAY
    try:
        image = torchvision.io.read_image(path, mode=mode)
    except RuntimeError as e:
        raise UserError(f"cannot decode {path} as an image ({str(e).strip().splitlines()[0]})")
    if image.dtype != torch.uint8:  # a 16-bit PNG: 0..65535 -> 0..255
        image = (image.to(torch.float32) / 257).round().to(torch.uint8)
    return image


def read_image(path, channels=3):
    """An image file -> float tensor (1, C, H, W) in [-1, 1], the autoencoder's input range."""
    if not os.path.isfile(path):
        raise UserError(f"no image at {path}")
    return decode_image(path, channels)[None].float() / 127.5 - 1


OUTPUT_EXTENSIONS = (".png", ".jpg", ".jpeg")


def write_atomically(path, write):
    """write(path + ".tmp"), then rename it to path: a reader never sees half a file, and a failed or
    interrupted write leaves nothing behind. Every file this program writes goes through here."""
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException:
        if os.path.isfile(path + ".tmp"):
            os.remove(path + ".tmp")
        raise


def write_image(x, path):
    """(C, H, W) in [-1, 1] -> PNG, or JPEG (quality 95) when the name ends in .jpg or .jpeg; atomically."""
    image = to_uint8(x).cpu()
    if path.lower().endswith((".jpg", ".jpeg")):
        write_atomically(path, lambda tmp: torchvision.io.write_jpeg(image, tmp, quality=95))
    else:
        write_atomically(path, lambda tmp: torchvision.io.write_png(image, tmp))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TORCHVISION_DATASETS = {  # name: (class, keyword arguments for the training split)
    "cifar10": (torchvision.datasets.CIFAR10, {"train": True}),
    "mnist": (torchvision.datasets.MNIST, {"train": True}),
    "celeba": (torchvision.datasets.CelebA, {"split": "all"}),
}


def fit(images, resolution):
    """uint8 (N, C, H, W) -> uint8 (N, C, r, r): the shorter side resized to r (bilinear,
    antialiased), then the centre cropped. Images that are r x r already are left alone."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    h, w = images.shape[-2:]
    size = (max(resolution, round(h * resolution / min(h, w))), max(resolution, round(w * resolution / min(h, w))))
    out = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return out[..., top:top + resolution, left:left + resolution].round().clamp(0, 255).to(torch.uint8)


class ImageFiles(torch.utils.data.Dataset):
    """Image files decoded with torchvision.io when asked for (in the DataLoader's workers)."""

    def __init__(self, files, resolution):
        self.files, self.resolution = files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return fit(decode_image(self.files[i])[None], self.resolution)[0]


class ImageTensor(torch.utils.data.Dataset):
    """Images already in memory, uint8 (N, 3, r, r)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def load_images(spec, resolution, root):
    """--data SPEC -> (a Dataset of uint8 (3, r, r) images, their labels or None).

    SPEC is a folder of images (searched recursively), an .npz file whose `images` are uint8
    N x H x W x C (and whose `labels`, if any, stratify the held-out split), or the name of a
    torchvision dataset (cifar10, mnist, celeba: its training split) kept under ROOT and downloaded
    when missing. Arrays are resized once, here; grey images are repeated to three channels."""
    if spec in TORCHVISION_DATASETS:
        return torchvision_images(spec, root, resolution)
    if spec.endswith(".npz"):
        images, labels = npz_images(spec)
        return image_tensor(images, resolution), labels
    if os.path.isdir(spec):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(spec) for f in names
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise UserError(f"--data {spec}: no images ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below it")
        return ImageFiles(files, resolution), None
    raise UserError(f"--data {spec}: not a folder, an .npz file, or one of {', '.join(TORCHVISION_DATASETS)}")


def npz_images(spec):
    """An .npz file's uint8 `images` (N, H, W[, C]) as (N, C, H, W), and its `labels` or None."""
    if not os.path.isfile(spec):
        raise UserError(f"--data {spec}: no such file")
    try:
        with np.load(spec) as f:
            if "images" not in f.files:
                raise UserError(f"{spec} has no 'images' array (it has: {', '.join(f.files)})")
            images, labels = f["images"], (torch.as_tensor(f["labels"]) if "labels" in f.files else None)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:  # not an npz (numpy then tries pickle)
        raise UserError(f"--data {spec} is not a readable .npz file ({type(e).__name__})")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] > 4):
        raise UserError(f"{spec}: 'images' must be uint8 N x H x W x C (C = 1 to 4), not {images.dtype} {images.shape}")
    return torch.from_numpy(images.reshape(*images.shape[:3], -1)).permute(0, 3, 1, 2), labels


def image_tensor(images, resolution):
    """uint8 (N, C, H, W) -> ImageTensor of RGB images at the resolution, converted as decode_image converts
    files: grey (C = 1, 2) repeated to three channels, alpha (C = 2, 4) dropped."""
    images = images[:, :1].expand(-1, 3, -1, -1) if images.shape[1] <= 2 else images[:, :3]
    check_memory(len(images) * 3 * resolution ** 2 * 5, f"--resolution {resolution}: resizing {len(images):,} images")
    return ImageTensor(fit(images.contiguous(), resolution))


def check_memory(needed, what, have=None):
    """A one-line error, instead of an allocation that runs until the machine gives up, when work certainly needs
    more memory (bytes, a lower bound) than the machine has (`have`, or its RAM)."""
    if have is None:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else float("inf")
    if needed > have:
        raise UserError(f"{what} needs at least {needed / 2 ** 30:,.1f} GiB, more than this machine's "
                        f"{have / 2 ** 30:,.1f} GiB")


def torchvision_images(name, root, resolution):
    cls, kwargs = TORCHVISION_DATASETS[name]
    try:
        try:
            dataset = cls(root, download=False, **kwargs)
        except RuntimeError:  # "Dataset not found": fetch it
            print(f"downloading {name} into {root}")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                dataset = cls(root, download=True, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:  # no network (URLError is an OSError), bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not get {name} ({reason}); put its files where torchvision.datasets."
                        f"{cls.__name__}(root={root!r}) looks for them, or pass --data-root")
    if name == "celeba":
        folder = os.path.join(root, dataset.base_folder, "img_align_celeba")
        return ImageFiles([os.path.join(folder, f) for f in dataset.filename], resolution), None
    images = torch.as_tensor(dataset.data)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # MNIST N x H x W, CIFAR N x H x W x C
    return image_tensor(images, resolution), torch.as_tensor(dataset.targets)


def split(n, val_size, labels=None, seed=0):
    """(train indices, held-out indices), the held-out set of val_size items drawn with a fixed
    seed; stratified when labels are given (each class contributes its share, largest remainders
    rounded up)."""
    if not 0 < val_size < n:
        raise UserError(f"--val-size {val_size} must be between 1 and {n - 1}, the number of images minus one")
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        return perm[val_size:], perm[:val_size]
    classes = labels.unique()
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    share = torch.tensor([len(m) * val_size / n for m in members])
    take = share.floor().long()
    take[torch.argsort(share - take, descending=True)[:val_size - int(take.sum())]] += 1
    val = torch.cat([m[torch.randperm(len(m), generator=g)[:k]] for m, k in zip(members, take)])
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return torch.nonzero(mask).flatten(), val.sort().values


def datasets(args):
    """(training set, held-out set) from --data, with --val-data or a --val-size split (stratified
    by label when the data has labels; fixed by --seed)."""
    data, labels = load_images(args.data, args.resolution, args.data_root)
    if args.val_data:
        val, _ = load_images(args.val_data, args.resolution, args.data_root)
        return data, val
    train_idx, val_idx = split(len(data), args.val_size, labels, args.seed)
    return torch.utils.data.Subset(data, train_idx.tolist()), torch.utils.data.Subset(data, val_idx.tolist())


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (one permutation per epoch from the seed, this rank's share of it) that
    can start an epoch part-way through, so that --resume sees the batches it would have seen."""

    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def to_model_input(batch, device, flip_seed=None):
    """uint8 (B, 3, r, r) -> float in [-1, 1] on the device; with flip_seed, a random half of the
    batch mirrored left-right, drawn from that seed (so a resumed run flips the same images)."""
    x = batch.to(device, non_blocking=True).float() / 127.5 - 1
    if flip_seed is not None:
        flip = torch.rand(len(x), generator=torch.Generator().manual_seed(flip_seed)) < 0.5
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
    return x


def held_out_batches(images, device, workers, batch_size=64):
    """The held-out images in order, as model inputs on the device. The DataLoader gets a generator of its own:
    its seed draw would otherwise advance the global random state, and a resumed run would differ."""
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=workers,
                                         generator=torch.Generator())
    progress = Progress("held-out evaluation", len(images))
    for batch in loader:
        yield to_model_input(batch, device)
        progress.update(len(batch))

# -----------------------------------------------------------------------------
# pretrained networks: VGG16 for the perceptual loss, LPIPS' channel weights, Inception-v3 for rFID


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def load_pretrained(url, needed_by, otherwise=""):
    """torchvision's pretrained weights at url, as a state dict. They live in $TORCH_HOME/hub/checkpoints,
    downloaded there on first use or put there by hand, so the file is checked on every load, not only
    on download: its sha256 must begin with the hex digits in its name (torchvision names its files so),
    and it is unpickled with weights_only=True. A file planted under that name is refused unread."""
    name = os.path.basename(url)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path, known = os.path.join(folder, name), name.split("-")[-1].split(".")[0]
    try:
        if not os.path.isfile(path):
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=known, progress=False)
        with open(path, "rb") as f:
            data = f.read()  # hashed and unpickled from memory: the file cannot change between the two
        found = hashlib.sha256(data).hexdigest()
        if not found.startswith(known):
            raise UserError(f"{path} is not torchvision's {name} (its sha256 begins {found[:len(known)]}, not "
                            f"{known}), so it is not loaded: replace it with the file from {url}")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, MemoryError, pickle.UnpicklingError) as e:  # no network (URLError: OSError)
        raise UserError(f"{needed_by} needs torchvision's {name} and could not get it ({type(e).__name__}); "
                        f"put that file into {folder}{otherwise}")


def load_vgg16():
    """torchvision's ImageNet VGG16 convolutional layers (downloaded on first use)."""
    state = load_pretrained(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url, "the perceptual loss",
                            ", or train without it: --perceptual-weight 0")
    vgg = torchvision.models.vgg16(weights=None)
    vgg.load_state_dict(state)
    return vgg.features


def load_lpips_weights(perceptual, path):
    """The LPIPS project's calibrated per-channel weights (v0.1 vgg.pth: lin0..lin4.model.1.weight,
    shapes [1, C, 1, 1]) into a Perceptual module."""
    if not os.path.isfile(path):
        raise UserError(f"--lpips-weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for i, w in enumerate(perceptual.weights):
            value = state[f"lin{i}.model.1.weight"].flatten()
            if value.shape != w.shape or (value < 0).any():
                raise ValueError(f"lin{i} has {value.numel()} weights (need {w.numel()}, all >= 0)")
            w.data.copy_(value)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"--lpips-weights {path} is not LPIPS v0.1 vgg weights ({type(e).__name__}: {e})")


INCEPTION = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1


def load_inception(device):
    """torchvision's ImageNet Inception-v3 without its classifier: images -> 2048-d pool features."""
    state = load_pretrained(INCEPTION.url, "--fid")  # first: a missing or refused file fails before any work
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    net.load_state_dict(state)
    net.fc = nn.Identity()
    return net.eval().to(device)


def inception_features(net, x):
    """x (B, 3, H, W) in [0, 1] -> (B, 2048) float64: bilinear resize to 299, ImageNet normalisation."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
    return net((x - mean) / std).double()

# -----------------------------------------------------------------------------
# weights I/O: a safetensors reader and writer, .ckpt files, LDM and older names, configs, export

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
MAX_HEADER = 100_000_000  # bytes; the safetensors format caps its JSON header at this size


class SafetensorsError(UserError):
    """A file that is not valid safetensors: raised before any tensor data is read."""


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor} (on the CPU, in the file's dtypes).

    The format: an 8-byte little-endian unsigned header length N, N bytes of JSON mapping each
    name to {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional "__metadata__"),
    then the raw little-endian bytes of the tensors, offsets counted from the end of the header.
    Everything is checked before a tensor is built (safetensors_entries).
    """
    if sys.byteorder != "little":
        raise SafetensorsError("this reader assumes a little-endian machine")
    if not os.path.isfile(path):
        raise SafetensorsError(f"no weights file at {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise SafetensorsError(f"{path} is not safetensors: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path} is not safetensors or is truncated: header length {n} with "
                                   f"{size - 8} bytes after it")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({e})")
        entries = safetensors_entries(header, size - 8 - n, path)
        data = bytearray(f.read(size - 8 - n))
    tensors = {}
    for begin, stop, name, dtype, shape in entries:
        torch_dtype = SAFETENSORS_DTYPES[dtype]
        if stop == begin:
            tensors[name] = torch.empty(shape, dtype=torch_dtype)
        else:
            tensors[name] = torch.frombuffer(data, dtype=torch_dtype, count=math.prod(shape),
                                             offset=begin).reshape(shape)
    return tensors


def safetensors_entries(header, data_len, path):
    """The header's tensors as (begin, end, name, dtype, shape), sorted by offset, after checking each
    dtype, each shape, that each byte range has the size shape x item size, and that the ranges tile the
    data_len bytes of data exactly, in order, with no gap or overlap and nothing past the end of the file."""
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise SafetensorsError(f"{where} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise SafetensorsError(f"{where} has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise SafetensorsError(f"{where} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{where} has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise SafetensorsError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                                   f"but {dtype} {shape} needs {nbytes}")
        entries.append((offsets[0], offsets[1], name, dtype, shape))
    entries.sort()
    end = 0
    for begin, stop, name, _, _ in entries:
        if begin != end:
            raise SafetensorsError(f"{path}: tensor {name!r} starts at byte {begin} of the data, expected {end} "
                                   f"({'overlapping' if begin < end else 'a gap before it'})")
        end = stop
    if end != data_len:
        raise SafetensorsError(f"{path}: the tensors cover {end} bytes of data but the file holds {data_len} "
                               f"({'truncated' if end > data_len else 'trailing bytes'})")
    return entries


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} in the layout load_safetensors() reads (names sorted, the header
    padded with spaces to a multiple of 8 bytes, as the safetensors package does); atomically."""
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for data in chunks:
                f.write(data)
    write_atomically(path, write)


def safetensors_metadata(path):
    """The "__metadata__" strings of a safetensors file that load_safetensors has read (so its header is valid)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate names {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    return dict(pairs)


def read_weights(path):
    """A weights file -> {name: tensor}: .safetensors (read above), or a pickled .ckpt/.pt/.pth/.bin read with
    torch.load(weights_only=True), which builds tensors and plain containers and refuses anything else (a pickle
    can name any Python function to call; such a file is refused, never run). A whole training checkpoint's
    "state_dict" is taken out of it."""
    if os.path.isdir(path):
        return read_weights(weights_in_folder(path))
    if not os.path.isfile(path):
        raise UserError(f"no weights file at {path}")
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, KeyError, RuntimeError, EOFError, OSError, ValueError) as e:
        needs = re.search(r"GLOBAL (\S+)", str(e))
        if needs:
            raise UserError(f"{path} holds Python objects besides tensors ({needs[1]}); unpickling them could run "
                            f"code, so the file is refused: use a .safetensors version of these weights")
        raise UserError(f"{path} is not a safetensors file or a PyTorch checkpoint ({type(e).__name__})")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} holds no state dict (a dict of tensors)")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def weights_in_folder(folder):
    """A diffusers model folder's weights file."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise UserError(f"{folder} is a folder without diffusion_pytorch_model.safetensors: give the weights file")


# The CompVis/LDM names of most community VAE files and of the VAE inside whole Stable Diffusion checkpoints, as
# rewrites of diffusers' names (decoder levels count the other way round there: up.{levels - 1 - i}).
LDM_PREFIXES = ("first_stage_model.", "vae.")  # the VAE's keys inside a whole SD checkpoint
LDM_RULES = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample."),
    (r"\.mid_block\.resnets\.(\d)\.", lambda m, n: f".mid.block_{int(m[1]) + 1}."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_([qkv])\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # diffusers < 0.14


def ldm_names(config):
    """{diffusers name: LDM name} for every weight of an AutoencoderKL with this config."""
    with torch.device("meta"):  # the names without the memory
        names = list(AutoencoderKL(**config).state_dict())
    levels = len(config["block_out_channels"])
    table = {}
    for name in names:
        ldm = name
        for pattern, new in LDM_RULES:
            ldm = re.sub(pattern, new if isinstance(new, str) else lambda m, new=new: new(m, levels), ldm)
        table[name] = ldm
    return table


def is_attention_matrix(name):
    """A weight that diffusers keeps as a Linear's [C, C] and LDM as a 1x1 convolution's [C, C, 1, 1]."""
    return name.endswith(".weight") and (".attentions." in name or ".attn_1." in name) and "norm" not in name


def to_ldm(state, config):
    """A diffusers-format state dict in LDM names and shapes (what ComfyUI and A1111-style tools load)."""
    return {ldm: state[name][:, :, None, None] if is_attention_matrix(name) else state[name]
            for name, ldm in ldm_names(config).items()}


def diffusers_names(state, config):
    """A state dict in any of the names VAE files use -> diffusers' names and shapes: the VAE's part of a whole
    SD checkpoint (keys under first_stage_model. or vae.), LDM names, diffusers' older attention names."""
    prefix = next((p for p in LDM_PREFIXES if any(k.startswith(p) for k in state)), "")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in state):  # LDM names
        diffusers_name = {ldm: name for name, ldm in ldm_names(config).items()}
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


def load_weights(model, state, source="the state dict", which=None):
    """Load a state dict in diffusers', LDM's or an older naming (diffusers_names) with strict key and shape
    checks, raising one-line errors that name what does not fit."""
    state = diffusers_names(state, model.config)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    which = f" ({which})" if which else ""
    hint = "; pass the --preset or --config these weights were made for"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise UserError(f"{source} does not fit this model{which}: keys {'; '.join(parts)}{hint}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{source} does not fit this model{which}: {name} is {list(tensor.shape)} there "
                            f"and {list(expected[name].shape)} here{hint}")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{source}: {name} holds NaN or infinite values; these weights cannot reconstruct anything")
    model.load_state_dict(state, strict=True)
    return model


def with_lists(d):
    """The dict with its tuples as lists, as JSON and a reloaded checkpoint hold them (so they compare equal)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def diffusers_config(config):
    """Our config as diffusers' config.json holds it (every field, the latent convention too)."""
    n = len(config["block_out_channels"])
    return {"_class_name": "AutoencoderKL", "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, **with_lists(config)}


def read_config(path):
    """A diffusers AutoencoderKL config.json (or a folder holding one) -> AutoencoderKL keywords. Every field that
    changes the model is honoured, the latent convention kept, and a field this file does not know is refused
    (diffusers' own bookkeeping, the keys starting with "_", is skipped)."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--config {path}: cannot read a JSON config ({type(e).__name__}: {e})")
    if not isinstance(config, dict):
        raise UserError(f"--config {path}: not a JSON object")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise UserError(f"--config {path} is a {config['_class_name']} config, not an AutoencoderKL one")
    for key, block in {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}.items():
        if any(t != block for t in config.pop(key, [])):
            raise UserError(f"--config {path}: {key} other than {block} are not AutoencoderKL's")
    names = inspect.signature(AutoencoderKL).parameters
    unknown = sorted(k for k in config if k not in names and not k.startswith("_"))
    if unknown:
        raise UserError(f"--config {path}: unknown AutoencoderKL fields {', '.join(unknown)}")
    if config.get("act_fn", "silu") not in ACTIVATIONS:
        raise UserError(f"--config {path}: act_fn {config['act_fn']!r} is not one of {', '.join(ACTIVATIONS)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names}


def export(autoencoder, path, overwrite=False, fmt="diffusers"):
    """Write the weights as FILE.safetensors. diffusers format: with diffusers' config.json beside it, so that
    diffusers.AutoencoderKL.from_pretrained(folder of FILE) loads them (name FILE diffusion_pytorch_model.safetensors).
    ldm format: one file in LDM names, as ComfyUI, A1111-style tools and diffusers' from_single_file load it, the
    config in its metadata."""
    config = diffusers_config(autoencoder.config)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "ldm":
        save_safetensors(to_ldm(autoencoder.state_dict(), autoencoder.config), path,
                         metadata={"format": "pt", "config": json.dumps(config)})
        print(f"exported {path} (LDM names)")
        return
    config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.exists(config_path) and not overwrite:
        with open(config_path) as f:
            if json.load(f) != config:
                raise UserError(f"{config_path} exists and describes another model: export into another folder, "
                                f"or pass --overwrite")
    save_safetensors(autoencoder.state_dict(), path, metadata={"format": "pt"})

    def write_config(tmp):
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
    write_atomically(config_path, write_config)
    print(f"exported {path} and {config_path}")

# -----------------------------------------------------------------------------
# latents for diffusion models, and large images in tiles


def to_diffusion_latents(z, config):
    """The latents a diffusion model works on: z_model = (z - shift_factor) * scaling_factor, or, where the config
    has per-channel latents_mean and latents_std, (z - latents_mean) * scaling_factor / latents_std (the
    conventions of diffusers' SD3/Flux and SDXL pipelines)."""
    mean, std = latent_statistics(z, config)
    return (z - mean) * config["scaling_factor"] / std


def from_diffusion_latents(z_model, config):
    """The inverse of to_diffusion_latents: z = z_model * std / scaling_factor + mean, what the decoder takes."""
    mean, std = latent_statistics(z_model, config)
    return z_model * std / config["scaling_factor"] + mean


def latent_statistics(z, config):
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        return (torch.tensor(config[k], dtype=z.dtype, device=z.device).view(1, -1, 1, 1)
                for k in ("latents_mean", "latents_std"))
    return config.get("shift_factor") or 0.0, 1.0


TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor


def tiled(fn, x, size, out_size):
    """fn on overlapping size x size tiles of x, the outputs (out_size x out_size for a whole tile) blended
    linearly over their overlap: diffusers' enable_tiling scheme, step for step, so that the result is the
    same. Tiles start every (1 - TILE_OVERLAP) size; each output fades in from its upper and left neighbours
    (already blended) over TILE_OVERLAP out_size rows and columns, then keeps its first out_size - that."""
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


def encode(model, x, tile=False):
    """The posterior q(z|x); with tile, in tiles of the config's sample_size when x is larger than that (as
    diffusers' encode with enable_tiling)."""
    size = model.config["sample_size"]
    if tile and max(x.shape[2:]) > size:
        moments = tiled(lambda t: model.encode(t).parameters, x, size, size // model.downsampling_factor)
        return DiagonalGaussianDistribution(moments)
    return model.encode(x)


def decode(model, z, tile=False):
    """The image of z; with tile, in tiles of sample_size / f latent pixels when z is larger (as diffusers)."""
    size = model.config["sample_size"] // model.downsampling_factor
    if tile and max(z.shape[2:]) > size:
        return tiled(model.decode, z, size, model.config["sample_size"])
    return model.decode(z)

# -----------------------------------------------------------------------------
# distributed training and exact resume


class Ranks:
    """This process among the training processes (torchrun sets WORLD_SIZE, RANK and LOCAL_RANK:
    one process per device, NCCL on CUDA, gloo on the CPU; also with a single process, so that one
    GPU runs the same distributed code), and the collectives the run needs; without torchrun each
    of them is a no-op."""

    def __init__(self, device_name):
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # launched by torchrun
        self.device = get_device(device_name)
        if self.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if self.distributed:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0  # the process that logs, evaluates and writes files

    def mean_(self, tensors):
        """Average tensors over the ranks, in place."""
        if self.distributed:
            for t in tensors:
                dist.all_reduce(t)
                t.div_(self.world)

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] (every rank must call it)."""
        if not self.distributed:
            return [obj]
        objects = [None] * self.world
        dist.all_gather_object(objects, obj)
        return objects

    def close(self):
        if self.distributed:
            dist.destroy_process_group()


def weights_digest(*modules):
    """sha256 of the bytes of every parameter and buffer: equal on two ranks only if their
    weights (and the discriminator's BatchNorm statistics) are identical."""
    h = hashlib.sha256()
    for module in modules:
        for t in itertools.chain(module.parameters(), module.buffers()):
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path, state):
    write_atomically(path, lambda tmp: torch.save(state, tmp))


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def load_checkpoint(path):
    """A checkpoint of this program, read with weights_only=True (no code in it runs), or a one-line error."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first, or pass the path of one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds of errors for a file that is not a checkpoint
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = f"{type(e).__name__}: {reason}" if reason and not reason.isdigit() else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint ({detail}): pass a ckpt.pt that {PROGRAM} wrote")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise UserError(f"{path} is not a {PROGRAM} checkpoint (it lacks one of {', '.join(sorted(CHECKPOINT_KEYS))})")
    return ckpt


PROGRAM, CHECKPOINT_KEYS = "kl_autoencoder.py", {"model", "config", "step"}
LOG_COLUMNS = ("loss", "rec", "perceptual", "nll", "kl", "g", "lambda", "d")  # train_step's terms, as logged


def new_run(args, config, ranks):
    """A run's state: the networks, their optimizers, the EMA, the step and the log line in progress.
    Every rank starts from the same weights and then draws its own posterior samples."""
    cuda = ranks.device.type == "cuda"
    torch.manual_seed(args.seed)
    model = Trainable(AutoencoderKL(**config))
    if args.weights:  # fine-tuning: start from a published VAE, in any format reconstruct reads
        load_weights(model.autoencoder, read_weights(args.weights), args.weights, architecture(args)[1])
    model = model.to(ranks.device)
    disc = NLayerDiscriminator().to(ranks.device)
    torch.manual_seed(args.seed + ranks.rank)
    if ranks.distributed and cuda:
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    if cuda:
        model, disc = model.to(memory_format=torch.channels_last), disc.to(memory_format=torch.channels_last)
    recipe = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})  # LDM's, or as asked
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=recipe.lr, betas=recipe.betas)
    model.logvar.requires_grad_(recipe.learn_logvar)
    ema = copy.deepcopy(model.autoencoder).requires_grad_(False) if recipe.ema else None
    return types.SimpleNamespace(model=model, disc=disc, opt=opt, opt_d=opt_d, ema=ema, recipe=recipe, step=0,
                                 saved=None, sums=torch.zeros(len(LOG_COLUMNS), device=ranks.device), since_log=0)


def save_run(path, run, args, config, ranks):
    """The one place a run is written: everything that --resume needs to continue exactly."""
    rng, run.saved = ranks.gather(torch.get_rng_state()), run.step
    if ranks.main:
        save_checkpoint(path, {
            "model": run.model.autoencoder.state_dict(), "logvar": run.model.logvar.detach().cpu(),
            "disc": run.disc.state_dict(), "opt": run.opt.state_dict(), "opt_d": run.opt_d.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None, "step": run.step, "rng": rng,
            "log_sums": run.sums.cpu(), "since_log": run.since_log,
            "config": {"model": with_lists(config), **with_lists(vars(args))}})


def restore_run(run, ckpt, ranks):
    """The one place a run is read back: the inverse of save_run."""
    run.model.autoencoder.load_state_dict(ckpt["model"])
    run.model.logvar.data.copy_(ckpt["logvar"])
    run.disc.load_state_dict(ckpt["disc"])
    run.opt.load_state_dict(ckpt["opt"])
    run.opt_d.load_state_dict(ckpt["opt_d"])
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema"] if ckpt.get("ema") else ckpt["model"])
    run.step, run.sums, run.since_log = ckpt["step"], ckpt["log_sums"].to(ranks.device), ckpt["since_log"]
    run.saved = run.step
    if ranks.rank < len(ckpt["rng"]):
        torch.set_rng_state(ckpt["rng"][ranks.rank])


def drop_records_after(path, step):
    """Forget what a run logged after the checkpoint it is resumed from (it will log it again)."""
    if os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records if (r.get("step") or 0) <= step)
        os.replace(path + ".tmp", path)


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def check_writable(folder):
    """Make `folder` if need be and check that a file can be written in it, before any long work starts."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--out {folder} is a file, not a folder: pass a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"cannot write into {folder} ({e.strerror or type(e).__name__}): pass another --out")


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
class Progress:
    """Progress of long work on stdout, from its fifth second on (quicker work prints nothing): one line updated
    in place on a terminal, a line per tenth of the work otherwise."""

    def __init__(self, what, total):
        self.what, self.total, self.done, self.t0, self.shown = what, total, 0, time.time(), False

    def update(self, n):
        before, self.done = self.done, self.done + n
        elapsed = time.time() - self.t0
        if elapsed < 5 and not self.shown:
            return
        rate = self.done / elapsed
        line = (f"{self.what}: {self.done:,}/{self.total:,} images, {rate:,.1f} images/s, "
                f"{(self.total - self.done) / rate:,.0f} s left")
        if sys.stdout.isatty():
            print("\r" + line, end="\n" if self.done >= self.total else "", flush=True)
        elif not self.shown or self.done * 10 // self.total > before * 10 // self.total:
            print(line, flush=True)
        self.shown = True


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def interrupt(signum, frame):
    """SIGTERM (kill, a job scheduler's stop) ends the program the way Ctrl-C does: one line, exit 130."""
    raise KeyboardInterrupt

# -----------------------------------------------------------------------------
# the training run


def train(args):
    """Train with THE OBJECTIVE (module docstring) on --data, one process or one per device under torchrun."""
    ranks = Ranks(args.device)
    try:
        return training_run(args, ranks)
    finally:
        ranks.close()


def training_run(args, ranks):
    """The loop, in the style of nanoGPT's train.py; start_run sets up everything around it."""
    run, model, s = start_run(args, ranks)  # s: what the loop reads (data, frozen networks, step counts, paths)
    images, t0 = 0, time.perf_counter()
    while run.step < s.total:
        s.sampler.set_epoch(run.step // s.steps_per_epoch)  # the epoch's permutation, from where a resume left it
        s.sampler.start = (run.step % s.steps_per_epoch) * args.batch_size
        for batch in s.loader:
            # the batch, on the device (mirrored at random with --hflip, seeded by the step: a resume flips the same)
            x = to_model_input(batch, ranks.device, hash((args.seed, run.step, ranks.rank)) if args.hflip else None)
            if ranks.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            # one step of the autoencoder, its EMA and the discriminator
            terms = train_step(model, run.disc, x, run.step, opt=run.opt, opt_d=run.opt_d, cfg=run.recipe,
                               perceptual=s.perceptual, ema=run.ema)
            run.sums += torch.stack([terms[name] for name in LOG_COLUMNS])
            run.step, run.since_log, images = run.step + 1, run.since_log + 1, images + len(x) * ranks.world
            # the log: the means since the last line, over all ranks (the only host sync of the loop)
            log_now = run.step % args.log_every == 0 or run.step == s.total
            save_now = run.step % args.ckpt_every == 0 or run.step == s.total
            if log_now or save_now:
                means = mean_terms(run, ranks, s.ckpt_path)
            if log_now:
                log_line(run, means, ranks, images_per_s=images / (time.perf_counter() - t0), metrics=s.metrics)
                images, t0 = 0, time.perf_counter()
            # the checkpoint: written by rank 0, with every rank's random state
            if save_now:
                save_run(s.ckpt_path, run, args, config=s.config, ranks=ranks)
            # a periodic evaluation on the held-out images
            if args.eval_every and run.step % args.eval_every == 0 and run.step < s.total and ranks.main:
                evaluate_and_log(run.ema or run.model.autoencoder, s.val, args, step=run.step, out=args.out)
                run.model.train()
            if run.step >= s.total:
                break
    # the end: the same weights on every rank, the final evaluation, the export
    if ranks.distributed:
        digests = ranks.gather(weights_digest(run.model, run.disc))
        if len(set(digests)) != 1:
            raise RuntimeError(f"the ranks ended with different weights: {digests}")
        if ranks.main:
            print(f"weights identical on all {ranks.world} ranks (sha256 {digests[0][:16]})")
    if ranks.main:
        final = run.ema or run.model.autoencoder
        record = evaluate_and_log(final, s.val, args, step=run.step, out=args.out, inception=s.inception)
        if args.export:
            export(final, args.export, args.overwrite, args.export_format)
        return record


def start_run(args, ranks):
    """Everything the loop needs: a new or resumed run, the model to call (DDP around it under torchrun, compiled
    with --compile), the data, the frozen networks; checks first, so that a mistake fails before any work."""
    config = model_config(args)
    ckpt_path, metrics = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "metrics.jsonl")
    ckpt = open_checkpoint(args, config, ckpt_path, metrics)
    check_memory(args.batch_size * config["block_out_channels"][0] * args.resolution ** 2 * 4,
                 f"--resolution {args.resolution} with --batch-size {args.batch_size}: one batch's first activation",
                 torch.cuda.get_device_properties(ranks.device).total_memory if ranks.device.type == "cuda" else None)
    if ranks.main:
        check_writable(args.out)
    if ranks.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    perceptual = Perceptual(load_vgg16()).to(ranks.device) if args.perceptual_weight > 0 else None  # fails early
    if perceptual is not None and args.lpips_weights:
        load_lpips_weights(perceptual, args.lpips_weights)
    inception = load_inception(ranks.device) if args.fid and ranks.main else None
    data, val = datasets(args)
    sampler = ResumableSampler(data, num_replicas=ranks.world, rank=ranks.rank, shuffle=True, seed=args.seed,
                               drop_last=True)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=ranks.device.type == "cuda",
                                         persistent_workers=args.workers > 0,
                                         generator=torch.Generator())  # its seed draw must not touch the global RNG
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {args.batch_size} is more than the {len(sampler)} training images of each "
                        f"of the {ranks.world} processes")
    total = args.steps if args.steps is not None else args.epochs * steps_per_epoch
    run = new_run(args, config, ranks)
    if ckpt is not None:
        restore_run(run, ckpt, ranks)
        if ranks.main:
            drop_records_after(metrics, run.step)
            print(f"resuming {ckpt_path} at step {run.step}")
    # the discriminator is not in DDP: it also runs (frozen) in the autoencoder's loss; train_step averages its grads
    model = run.model
    if ranks.distributed:
        model = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None)
    if args.compile:
        model.compile()
    if ranks.main and ckpt is None:
        open(metrics, "w").close()
        n_params = sum(p.numel() for p in run.model.autoencoder.parameters())
        print(f"AutoencoderKL {config['block_out_channels']}, {n_params:,} parameters; {len(data):,} training and "
              f"{len(val):,} held-out images at {args.resolution}x{args.resolution}; {ranks.world} process(es) on "
              f"{ranks.device}; {total:,} steps")
    if ranks.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ranks.device)
    return run, model, types.SimpleNamespace(config=config, sampler=sampler, loader=loader, val=val, total=total,
                                             steps_per_epoch=steps_per_epoch, perceptual=perceptual,
                                             inception=inception, ckpt_path=ckpt_path, metrics=metrics)


def open_checkpoint(args, config, ckpt_path, metrics):
    """The checkpoint --resume continues (None for a new run, which must not write over another run's files)."""
    if not args.resume:
        for path in (ckpt_path, metrics, os.path.join(args.out, "reconstructions.png")):
            if os.path.exists(path) and not args.overwrite:
                raise UserError(f"{path} exists: pass --resume to continue that run, another --out, or --overwrite")
        return None
    ckpt = load_checkpoint(ckpt_path)
    if with_lists(complete(ckpt["config"]["model"])) != with_lists(config):
        raise UserError(f"{ckpt_path} holds a model {ckpt['config']['model']}, not {config}: "
                        f"pass its sizes, or another --out")
    return ckpt


def mean_terms(run, ranks, ckpt_path):
    """The means of the logged terms since the last log line, averaged over the ranks, as floats; a run whose
    loss is not finite stops here, before a bad state is saved."""
    values = run.sums / run.since_log
    ranks.mean_([values])
    means = dict(zip(LOG_COLUMNS, values.tolist()))
    if not all(math.isfinite(v) for v in means.values()):
        kept = f"{ckpt_path} holds the last good step, {run.saved}" if run.saved is not None else "no checkpoint yet"
        raise UserError(f"the loss became {means['loss']} by step {run.step} ({kept}): try a lower --lr")
    return means


def log_line(run, means, ranks, images_per_s, metrics):
    """One line of the training log, printed and appended to metrics.jsonl by rank 0; then a new line starts."""
    record = {"kind": "train", "step": run.step, **means, "logvar": run.model.logvar.item(),
              "images_per_s": images_per_s}
    cuda = ranks.device.type == "cuda"
    if cuda:
        record["peak_gib"] = torch.cuda.max_memory_allocated(ranks.device) / 2 ** 30
    if ranks.main:
        append_jsonl(metrics, record)
        print(f"step {run.step:6d} | " + " | ".join(f"{k} {record[k]:.4g}" for k in [*LOG_COLUMNS, "logvar"])
              + f" | {images_per_s:.1f} img/s" + (f" | {record['peak_gib']:.2f} GiB" if cuda else ""), flush=True)
    run.sums.zero_()
    run.since_log = 0


def evaluate_and_log(autoencoder, val, args, step, out, inception=None):
    """evaluate() on the held-out images, printed, appended to OUT/metrics.jsonl, with OUT/reconstructions.png."""
    device = next(autoencoder.parameters()).device
    features = (lambda x: inception_features(inception, x)) if inception is not None else None
    record = {"kind": "eval", "step": step,
              **evaluate(autoencoder, held_out_batches(val, device, args.workers), args.precision, features)}
    print(f"eval on {record['images']:,} held-out images" + (f" at step {step}" if step is not None else "")
          + f": PSNR {record['psnr']:.2f} dB | SSIM {record['ssim']:.4f} | "
          + (f"rFID {record['rfid']:.2f} | " if "rfid" in record else "")
          + f"KL {record['kl']:.1f} nats | latent std {record['latent_std']:.4f} | "
          f"scaling factor {record['scaling_factor']:.5f}", flush=True)
    append_jsonl(os.path.join(out, "metrics.jsonl"), record)
    write_reconstructions(autoencoder, val, os.path.join(out, "reconstructions.png"), args.precision)
    return record


@torch.no_grad()
def write_reconstructions(autoencoder, images, path, precision, n=8):
    """The first n held-out images above their reconstructions (decoded posterior means), one PNG."""
    device = next(autoencoder.parameters()).device
    x = to_model_input(torch.stack([images[i] for i in range(min(n, len(images)))]), device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        x_rec = autoencoder.decode(autoencoder.encode(x).mode()).float()
    write_image(torchvision.utils.make_grid(torch.cat([x, x_rec]), nrow=len(x), padding=2, pad_value=1), path)

# -----------------------------------------------------------------------------
# the command line


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we want one line, like our own errors
        raise UserError(f"{message} (see --help)")


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def _number(kind, low, inclusive, high=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (value >= low if inclusive else value > low) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return value
    return parse


positive_int, nonnegative_int = _number(int, 0, False), _number(int, 0, True)
positive_float, nonnegative_float = _number(float, 0, False), _number(float, 0, True)
seed = _number(int, 0, True, 2 ** 63 - 1)


def decay(text):
    """A number in [0, 1): an EMA's decay, Adam's betas."""
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def get_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device here (torch.cuda.is_available() is False); "
                        "use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this PyTorch has no MPS (Apple GPU) backend here; use --device cpu or auto")
    return torch.device(name)


def parse_args(argv=None):
    p = Parser(description="The Stable Diffusion KL autoencoder: reconstruct, encode and decode images, convert "
                           "weights files, train, evaluate.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    r = sub.add_parser("reconstruct", help="encode and decode one image", formatter_class=fmt)
    add_model_source(r)
    r.add_argument("--image", required=True)
    r.add_argument("--out", required=True, help="where to write the reconstruction (.png, or .jpg)")
    add_inference_options(r)

    n = sub.add_parser("encode", help="images -> latents for diffusion training (one .safetensors file)",
                       formatter_class=fmt)
    add_model_source(n)
    n.add_argument("--data", required=True, help="a folder of images, an .npz file, or cifar10, mnist, celeba")
    n.add_argument("--data-root", default="./data", help="where torchvision datasets are kept")
    n.add_argument("--resolution", type=positive_int, default=None,
                   help="images are resized and centre-cropped to this square (default: the config's sample_size)")
    n.add_argument("--out", required=True, help="the latents file (.safetensors)")
    n.add_argument("--sample", action="store_true", help="latents from a posterior sample (default: its mean)")
    n.add_argument("--seed", type=seed, default=0, help="of the posterior samples")
    n.add_argument("--batch-size", type=positive_int, default=8)
    n.add_argument("--workers", type=nonnegative_int, default=None,
                   help="DataLoader workers (default: up to 4 for image files, 0 for arrays in memory)")
    add_inference_options(n)

    d = sub.add_parser("decode", help="latents (a file of encode, or any with 'latents') -> images",
                       formatter_class=fmt)
    add_model_source(d)
    d.add_argument("--latents", required=True, help="a .safetensors file with a 'latents' tensor (N, C, h, w)")
    d.add_argument("--out", required=True, help="a folder for the images (PNG)")
    d.add_argument("--batch-size", type=positive_int, default=1)
    add_inference_options(d)

    c = sub.add_parser("convert", help="a weights file to diffusers or LDM format", formatter_class=fmt)
    add_model_source(c)
    add_export_options(c, required=True)

    t = sub.add_parser("train", help="train an autoencoder (one process, or one per GPU under torchrun)",
                       formatter_class=fmt)
    e = sub.add_parser("eval", help="evaluate a checkpoint or weights on held-out images", formatter_class=fmt)
    add_model_source(e)
    for q, training in ((t, True), (e, False)):  # what both need; eval's defaults come from the checkpoint
        add_data_options(q, training)
    e.add_argument("--out", default=None,
                   help="where reconstructions.png and metrics.jsonl go (default: the checkpoint's folder)")
    add_training_options(t)
    return settle(p.parse_args(argv))


def add_model_source(q):
    g = q.add_argument_group("model")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", help="a .safetensors, .ckpt or .pt file in diffusers' or LDM's names (a whole "
                                          "Stable Diffusion checkpoint too), or a diffusers folder with config.json")
    source.add_argument("--ckpt", help="a checkpoint written by train (its model's config is in it)")
    g.add_argument("--ema", action="store_true", help="with --ckpt: its EMA weights")
    add_architecture_options(g)


def add_architecture_options(g):
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="the architecture (default: a --weights folder's config.json, else sd); refused where it "
                        "contradicts that config.json")
    g.add_argument("--config", default=None, help="a diffusers AutoencoderKL config.json (or its folder)")


def add_inference_options(q):
    q.add_argument("--device", default="auto", choices=DEVICES)
    q.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="bf16 is for GPUs; fp16 runs in fp32 where the config says force_upcast (it overflows)")
    q.add_argument("--tile", default="auto", choices=["auto", "on", "off"],
                   help=f"encode and decode in tiles of the config's sample_size, as diffusers' enable_tiling "
                        f"(auto: for images of more than {AUTO_TILE_PIXELS:,} pixels, 1024 x 1024)")
    q.add_argument("--overwrite", action="store_true", help="replace existing output files")


def add_export_options(q, required=False):
    q.add_argument("--export", default=None, required=required, metavar="FILE",
                   help="also write the weights as a .safetensors file" if not required else "the .safetensors file")
    q.add_argument("--export-format", default="diffusers", choices=["diffusers", "ldm"],
                   help="diffusers: config.json beside FILE; ldm: one file in CompVis/LDM names (ComfyUI, A1111)")
    q.add_argument("--overwrite", action="store_true", help="replace existing output files")


TRAINING_DATA_DEFAULTS = {"val_size": 1000, "data_root": "./data", "resolution": 256, "seed": 0}


def add_data_options(q, training):
    defaults = TRAINING_DATA_DEFAULTS if training else dict.fromkeys(TRAINING_DATA_DEFAULTS)  # eval settles them later
    g = q.add_argument_group("data")
    g.add_argument("--data", required=training, default=None,
                   help="a folder of images, an .npz file (uint8 N x H x W x C 'images'), or cifar10, mnist, celeba")
    g.add_argument("--val-data", default=None, help="held-out images (otherwise --val-size images of --data)")
    g.add_argument("--val-size", type=positive_int, default=defaults["val_size"],
                   help="held-out images split off --data (stratified by label when it has labels)")
    g.add_argument("--data-root", default=defaults["data_root"], help="where torchvision datasets are kept")
    g.add_argument("--resolution", type=positive_int, default=defaults["resolution"],
                   help="images are resized and centre-cropped to this square")
    g.add_argument("--workers", type=nonnegative_int, default=None,
                   help="DataLoader workers (default: up to 4 for image files, 0 for arrays in memory)")
    g.add_argument("--seed", type=seed, default=defaults["seed"],
                   help="the split, the data order, the initialisation")
    g = q.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=DEVICES)
    g.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="autocast dtype (default: bf16 on CUDA, else fp32)")
    g.add_argument("--fid", action="store_true", help="also rFID (needs torchvision's Inception-v3 weights)")
    add_export_options(g)


def add_training_options(t):
    g = t.add_argument_group("model")
    g.add_argument("--weights", default=None, help="start from these weights (fine-tuning; any file reconstruct reads)")
    add_architecture_options(g)
    g.add_argument("--block-out-channels", type=positive_int, nargs="+", default=None, help="overrides the preset")
    g.add_argument("--layers-per-block", type=positive_int, default=None, help="overrides the preset")
    g.add_argument("--latent-channels", type=positive_int, default=None, help="overrides the preset")
    g.add_argument("--lpips-weights", default=None,
                   help="the LPIPS project's v0.1 vgg.pth for calibrated channel weights (default: all 1)")
    add_config_options(t.add_argument_group("the recipe (Config)"))
    g = t.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=positive_int, default=8, help="per process")
    g.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: --epochs, or 10000)")
    g.add_argument("--epochs", type=positive_int, default=None)
    g.add_argument("--hflip", action="store_true", help="random horizontal flips")
    g.add_argument("--compile", action="store_true")
    g = t.add_argument_group("outputs")
    g.add_argument("--out", default=os.path.join("runs", "kl"))
    g.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt")
    g.add_argument("--log-every", type=positive_int, default=50)
    g.add_argument("--ckpt-every", type=positive_int, default=1000)
    g.add_argument("--eval-every", type=nonnegative_int, default=1000,
                   help="held-out evaluation every N steps (0: only at the end)")


def add_config_options(g):
    """A train option for each field of Config, with its default and help (precision is a run option, of eval too)."""
    checks = {"lr": positive_float, "ema": decay, "betas": decay}  # the other numbers: >= 0
    for f in dataclasses.fields(Config):
        if f.name == "precision":
            continue
        kw = {"default": f.default, **f.metadata, "help": f.metadata["help"].replace("%", "%%")}  # argparse's %
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif not isinstance(f.default, str):
            kw["type"] = checks.get(f.name, nonnegative_int if isinstance(f.default, int) else nonnegative_float)
            kw["nargs"] = len(f.default) if isinstance(f.default, tuple) else None
        g.add_argument("--" + f.name.replace("_", "-"), **kw)


def settle(args):
    """The one place where defaults that depend on other options are settled and options are checked together
    (eval's remaining defaults come from its checkpoint, in eval_command)."""
    if args.command in ("train", "eval", "encode") and args.workers is None and args.data is not None:
        args.workers = default_workers(args.data)
    if args.config and args.preset:
        raise UserError("--config and --preset both describe the model: pass one of them")
    source = [] if args.command == "train" else [args.weights or args.ckpt]
    if args.command != "train":
        if args.ckpt and (args.config or args.preset):
            raise UserError("--ckpt holds its model's config: leave out --preset and --config")
        if args.ema and not args.ckpt:
            raise UserError("--ema needs --ckpt: a weights file holds one set of weights")
    if args.command == "reconstruct":
        check_output(args.out, "--out", [args.image, *source], overwrite=args.overwrite, extensions=OUTPUT_EXTENSIONS)
    if args.command == "encode":
        check_output(args.out, "--out", [args.data, *source], overwrite=args.overwrite, extensions=(".safetensors",),
                     make_folder=True)
    if args.command == "decode" and os.path.isfile(args.out):
        raise UserError(f"--out {args.out} is a file: give a folder for the images")
    if args.command == "eval" and args.weights and not args.out:
        raise UserError("eval --weights: pass --out, the folder for metrics.jsonl and reconstructions.png")
    if getattr(args, "export", None):
        inputs = source if args.command != "train" else [os.path.join(args.out, "ckpt.pt")]
        check_output(args.export, "--export", inputs, overwrite=args.overwrite, extensions=(".safetensors",),
                     make_folder=True)
    if args.command != "train":
        return args
    args.betas = tuple(args.betas)
    if args.steps is not None and args.epochs is not None:
        raise UserError("--steps and --epochs: pass one of them")
    if args.steps is None and args.epochs is None:
        args.steps = 10_000
    args.precision = args.precision or ("bf16" if get_device(args.device).type == "cuda" else "fp32")
    config = model_config(args)
    if any(c % config["norm_num_groups"] for c in config["block_out_channels"]):
        raise UserError(f"--block-out-channels {' '.join(map(str, config['block_out_channels']))}: each must be a "
                        f"multiple of {config['norm_num_groups']}, the number of GroupNorm groups")
    check_resolution(args.resolution, config, args.disc_weight)
    return args


def check_output(path, flag, inputs, overwrite, extensions, make_folder=False):
    """A file a command is about to write: never one of its inputs, never a folder, a kind it can write, and not
    an existing file unless --overwrite says so; its folder must exist unless the command makes it."""
    if any(os.path.abspath(path) == os.path.abspath(i) or (os.path.exists(path) and os.path.exists(i)
                                                          and os.path.samefile(path, i)) for i in inputs):
        raise UserError(f"{flag} {path} is also an input of this command: write to another file")
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder: give a file name")
    if not path.lower().endswith(extensions):
        raise UserError(f"{flag} {path}: can write {', '.join(extensions)} files only")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{flag} {path} exists: pass --overwrite to replace it, or another name")
    folder = os.path.dirname(os.path.abspath(path))
    if not make_folder and not os.path.isdir(folder):
        raise UserError(f"{flag} {path}: the folder {folder} does not exist")


def default_workers(data):
    """DataLoader workers: up to 4 (one per CPU core) to decode image files, none for arrays in memory."""
    return min(4, os.cpu_count() or 1) if os.path.isdir(data) or data == "celeba" else 0


def architecture(args):
    """(AutoencoderKL keywords, what they came from): --config, else the config.json of a --weights folder,
    else --preset (sd when none is given). A --preset that describes another model than the folder's config.json
    is refused (the tile size and force_upcast may differ)."""
    if args.config:
        return complete(read_config(args.config)), f"--config {args.config}"
    folder_config = os.path.join(args.weights, "config.json") if args.weights else ""
    if not os.path.isfile(folder_config):
        preset = args.preset or "sd"
        return complete(PRESETS[preset]), f"preset {preset}"
    config = complete(read_config(folder_config))
    if args.preset and any(v != config[k] for k, v in complete(PRESETS[args.preset]).items()
                           if k not in ("sample_size", "force_upcast")):
        raise UserError(f"--preset {args.preset} describes another model than {folder_config}: drop --preset")
    return config, folder_config


def complete(config):
    """Every AutoencoderKL keyword, those not given at their defaults: what the model's .config holds."""
    return {**{k: p.default for k, p in inspect.signature(AutoencoderKL).parameters.items()}, **config}


def model_config(args):
    """train's AutoencoderKL keywords: the architecture, overridden by explicit sizes."""
    config, _ = architecture(args)
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        if getattr(args, key) is not None:
            config[key] = tuple(getattr(args, key)) if key == "block_out_channels" else getattr(args, key)
    return config


def pretrained(args):
    """(the autoencoder, on the CPU in float32, and the checkpoint or None): built from the config in --ckpt,
    or from `architecture` and loaded with the --weights."""
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt)
        if args.ema and not ckpt.get("ema"):
            raise UserError(f"{args.ckpt} has no EMA weights (train with --ema DECAY)")
        model = AutoencoderKL(**ckpt["config"]["model"])
        model.load_state_dict(ckpt["ema"] if args.ema else ckpt["model"])
        return model.eval(), ckpt
    config, which = architecture(args)
    return load_weights(AutoencoderKL(**config), read_weights(args.weights), args.weights, which).eval(), None


DEVICES = ["auto", "cpu", "cuda", "mps"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_TILE_PIXELS = 1024 * 1024  # --tile auto tiles images larger than this (see README for the memory it saves)


def inference_setup(args, model):
    """(device, dtype) for reconstruct/encode/decode, with the model moved there. float16 is
    replaced by float32 where the config says force_upcast (float16 overflows in that model: SDXL's)."""
    device = get_device(args.device)
    dtype = DTYPES[args.dtype]
    if dtype == torch.float16 and model.config["force_upcast"]:
        print("--dtype fp16: this model's config says force_upcast (float16 overflows in it); running in fp32",
              file=sys.stderr)
        dtype = torch.float32
    model.to(device=device, dtype=dtype)
    return device, dtype


def use_tiles(args, pixels):
    return args.tile == "on" or (args.tile == "auto" and pixels > AUTO_TILE_PIXELS)


def check_resolution(resolution, config, disc_weight):
    f = 2 ** (len(config["block_out_channels"]) - 1)
    if resolution % f:
        raise UserError(f"--resolution {resolution} is not a multiple of {f}, this model's downsampling factor: "
                        f"use {max(f, resolution // f * f)} or {-(-resolution // f) * f}")
    if disc_weight > 0 and resolution < 24:
        raise UserError(f"--resolution {resolution}: the PatchGAN discriminator needs at least 24; "
                        f"use --disc-weight 0 below that")

# -----------------------------------------------------------------------------
# commands and entry point


@torch.no_grad()
def reconstruct(args):
    model, _ = pretrained(args)
    f = model.downsampling_factor
    x = read_image(args.image, model.config["in_channels"])
    h, w = x.shape[2:]
    if h < f or w < f:
        raise UserError(f"{args.image} is {h}x{w} (height x width), smaller than this model's downsampling "
                        f"factor {f}: it needs sides of at least {f}")
    if h % f or w % f:
        lo, hi = (f"{(h // f) * f}x{(w // f) * f}", f"{-(-h // f) * f}x{-(-w // f) * f}")
        raise UserError(f"{args.image} is {h}x{w} (height x width); this model needs sides that are "
                        f"multiples of {f}, e.g. {lo} or {hi}: crop or pad it")
    device, dtype = inference_setup(args, model)
    tile = use_tiles(args, h * w)
    tiled = tile and max(h, w) > model.config["sample_size"]  # encode() tiles only images larger than one tile
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    posterior = encode(model, x.to(device=device, dtype=dtype), tile)
    out = decode(model, posterior.mode(), tile)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    write_image(out[0], args.out)
    quality = psnr((to_uint8(out).float() / 255).cpu(), to_uint8(x).float() / 255).item()
    print(f"latent {list(posterior.mean.shape)} (B, C, H/{f}, W/{f}) | PSNR {quality:.2f} dB | {seconds:.3f} s on "
          f"{device} ({str(dtype).split('.')[1]}{', tiled' if tiled else ''}) | wrote {args.out}")
    return quality


@torch.no_grad()
def encode_command(args):
    """--data -> one safetensors file: `latents` = to_diffusion_latents(z) (z the posterior mean, or a sample with
    --sample), what a diffusion model trains on, and the posterior's `mean` and `logvar` (unscaled), all float32
    (N, C, h, w); `labels` when the data has them. The metadata holds the model's config (the scaling and shift
    used), how the latents were made, and the images' names in order."""
    model, _ = pretrained(args)
    if model.config["in_channels"] != 3:
        raise UserError(f"encode reads RGB images; this model takes {model.config['in_channels']} channels")
    resolution = args.resolution or model.config["sample_size"]
    check_resolution(resolution, model.config, 0)
    images, labels = load_images(args.data, resolution, args.data_root)
    c, h = model.config["latent_channels"], resolution // model.downsampling_factor
    check_memory(len(images) * c * h * h * 4 * 3, f"encoding {len(images):,} images at {resolution}")
    device, dtype = inference_setup(args, model)
    generator = torch.Generator(device).manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size, num_workers=args.workers,
                                         generator=torch.Generator())
    progress, parts = Progress("encoding", len(images)), []
    for batch in loader:
        posterior = encode(model, to_model_input(batch, device).to(dtype), use_tiles(args, resolution ** 2))
        z = posterior.sample(generator) if args.sample else posterior.mode()
        parts.append([t.float().cpu() for t in (to_diffusion_latents(z.float(), model.config), posterior.mean,
                                                posterior.logvar)])
        progress.update(len(batch))
    tensors = {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(("latents", "mean", "logvar"))}
    if labels is not None:
        tensors["labels"] = labels
    names = [os.path.relpath(f, args.data) for f in images.files] if isinstance(images, ImageFiles) else None
    made = f"to_diffusion_latents of the posterior {'sample (seed %d)' % args.seed if args.sample else 'mean'}"
    save_safetensors(tensors, args.out, metadata={"format": "pt", "config": json.dumps(diffusers_config(model.config)),
                                                  "latents": made, "resolution": resolution,
                                                  "names": json.dumps(names)})
    print(f"encoded {len(images):,} images at {resolution}x{resolution} into {args.out}: latents "
          f"{list(tensors['latents'].shape)} = {made}")


@torch.no_grad()
def decode_command(args):
    """A file's `latents` (N, C, h, w), taken back with from_diffusion_latents (with the scaling and shift in the
    file's metadata when it has them, else the model's) and decoded -> OUT/<name>.png for each."""
    latents, config = read_latents(args.latents)
    model, _ = pretrained(args)
    if latents.shape[1] != model.config["latent_channels"]:
        raise UserError(f"{args.latents}: latents have {latents.shape[1]} channels, this model "
                        f"{model.config['latent_channels']}")
    names = config.pop("names", None)
    if not (isinstance(names, list) and len(names) == len(latents) and all(  # names that stay inside --out
            isinstance(n, str) and not os.path.isabs(n) and not os.path.normpath(n).startswith("..") for n in names)):
        names = [f"{i:06d}.png" for i in range(len(latents))]
    paths = [os.path.join(args.out, os.path.splitext(n)[0] + ".png") for n in names]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists ({len(existing)} of the images): pass --overwrite, or another --out")
    device, dtype = inference_setup(args, model)
    z = from_diffusion_latents(latents, {**model.config, **config})
    tile = use_tiles(args, z.shape[2] * z.shape[3] * model.downsampling_factor ** 2)
    progress = Progress("decoding", len(z))
    for i in range(0, len(z), args.batch_size):
        x = decode(model, z[i:i + args.batch_size].to(device=device, dtype=dtype), tile).float()
        for image, path in zip(x, paths[i:i + args.batch_size]):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_image(image, path)
        progress.update(len(x))
    print(f"decoded {len(z):,} latents into {args.out}")


def read_latents(path):
    """(latents float32, the latent convention and image names in its metadata) of a latents file."""
    if not os.path.isfile(path):
        raise UserError(f"--latents {path}: no such file")
    tensors = load_safetensors(path)
    if "latents" not in tensors or tensors["latents"].ndim != 4:
        raise UserError(f"{path} has no 'latents' tensor of shape (N, C, h, w)")
    meta = safetensors_metadata(path)
    try:
        saved, names = json.loads(meta.get("config", "{}")), json.loads(meta.get("names", "null"))
    except ValueError:
        raise UserError(f"{path}: its metadata 'config' or 'names' is not JSON")
    keys = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
    return tensors["latents"].float(), {**{k: saved[k] for k in keys if k in saved}, "names": names}


def convert(args):
    export(pretrained(args)[0], args.export, args.overwrite, args.export_format)


def eval_command(args):
    model, ckpt = pretrained(args)
    saved = ckpt["config"] if ckpt else {
        "data": args.data, **TRAINING_DATA_DEFAULTS}  # the held-out split a default train run makes
    for key in ("data", "val_data", "val_size", "data_root", "resolution", "seed", "workers"):
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key))
    if args.data is None:
        raise UserError(f"{args.ckpt or args.weights} does not say what data to evaluate on: pass --data")
    if args.workers is None:
        args.workers = default_workers(args.data)
    check_resolution(args.resolution, model.config, 0)
    device = get_device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    model.to(device)
    inception = load_inception(device) if args.fid else None
    _, val = datasets(args)
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    if args.weights or os.path.abspath(out) != os.path.dirname(os.path.abspath(args.ckpt)):
        for name in ("metrics.jsonl", "reconstructions.png"):  # away from its own run's folder: another run's files
            if os.path.exists(os.path.join(out, name)) and not args.overwrite:
                raise UserError(f"{os.path.join(out, name)} exists: pass another --out, or --overwrite")
    check_writable(out)
    record = evaluate_and_log(model, val, args, step=ckpt["step"] if ckpt else 0, out=out, inception=inception)
    if args.export:
        export(model, args.export, args.overwrite, args.export_format)
    return record


def main(argv=None):
    previous = signal.signal(signal.SIGTERM, interrupt)  # put back on the way out: main() may be called from Python
    try:
        args = parse_args(argv)
        commands = {"reconstruct": reconstruct, "encode": encode_command, "decode": decode_command, "convert": convert,
                    "train": train, "eval": eval_command}
        return commands[args.command](args)
    except UserError as e:
        message = str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker, which wraps it in its traceback
            message = message.splitlines()[-1].split("Error: ", 1)[-1]
        print(f"kl_autoencoder.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("kl_autoencoder.py: interrupted; the last checkpoint is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)  # None: not set from Python


if __name__ == "__main__":
    main()
