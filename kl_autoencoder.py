"""
The KL autoencoder of Stable Diffusion (Rombach et al. 2022, "kl-f8"), in one file, to be read top
to bottom. The architecture is that of diffusers' AutoencoderKL, and the weights are interchangeable:
a diffusers state dict loads here with strict=True, key for key; so do the CompVis/LDM-named files of
the Stable Diffusion world (a whole SD checkpoint too), and any diffusers AutoencoderKL config.json (FLUX.2's
AutoencoderKLFlux2 too).

    python kl_autoencoder.py train --data images/ --preset sd --resolution 256 --out runs/kl
    torchrun --nproc_per_node 8 kl_autoencoder.py train --data images/ ...    # one process per GPU
    python kl_autoencoder.py eval --ckpt runs/kl/ckpt.pt --fid --export vae/diffusion_pytorch_model.safetensors
    python kl_autoencoder.py reconstruct --weights vae.safetensors --preset sd --image in.png --out out.png
    python kl_autoencoder.py encode --weights sdxl_vae.safetensors --preset sdxl --data images/ --out lat.safetensors
    python kl_autoencoder.py decode --weights sdxl_vae.safetensors --preset sdxl --latents lat.safetensors --out dec/
    python kl_autoencoder.py convert --weights v1-5.ckpt --export vae/diffusion_pytorch_model.safetensors
    python kl_autoencoder.py train --help                                     # every option

An image x (values in [-1, 1]) is encoded to a diagonal Gaussian posterior q(z|x) over a latent
with `latent_channels` channels and 1/f of the image's height and width (f = 2^(levels - 1), 8 for
SD); decoding z (the posterior mean, or a sample) gives the reconstruction x_rec. Diffusion models
work on z * scaling_factor, a number chosen so that the scaled latents have unit standard deviation.

THE OBJECTIVE (LDM's; sums over image values (C x H x W) and latent elements, means over the batch), one step:

    autoencoder    loss = nll + kl_weight * KL(q(z|x) || N(0, I)) + disc_weight * lambda * g
                   nll  = sum_{c,h,w} [(|x - x_rec| + perceptual_weight * P(x, x_rec)) / exp(s) + s]
                   g    = -mean D(x_rec),   lambda = clamp(||grad_L nll|| / (||grad_L g|| + 1e-4), 0, 1e4)
    discriminator  d    = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))

with x_rec the decoding of a sample z ~ q(z|x), P the LPIPS-style perceptual distance of the image (the same
for each of its values), s a scalar log-scale (LDM's "logvar": learned with --learn-logvar, the default; LDM's
code leaves it at 0), L the decoder's last layer (decoder.conv_out), D a PatchGAN discriminator, and both
adversarial terms off before --disc-start (LDM: step 50,001, beyond a default run's 10,000 steps). A learned s
divides the reconstruction terms by exp(s), which weights the KL by kl_weight * exp(s) relative to them. With
terms averaged over elements instead of summed, the same balance needs kl_weight * N_latent / N_values
(1e-6 -> about 2.08e-8 at 3 x 256 x 256, f = 8, 4 latent channels).

The file:
    Part I, a complete program: the model, the loss, Config (LDM's recipe and the run), train_step, the
        training loop (one process or many), its checkpoint, evaluate; then its plumbing (DataLoader workers that
        stop quietly, files written whole). It uses nothing defined after it.
    Part II, conveniences: image files and data sets, the pretrained networks, weights files (safetensors,
        checks, export), the command line generated from Config, train and eval, main.
    Part III, an appendix: Stable Diffusion files (the published families, configs, LDM's names, latents
        for diffusion models, tiles, reconstruct/encode/decode/convert); then the helpers shared with vae.py.
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import pathlib
import pickle
import re
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile

try:
    import fcntl  # POSIX: a run's folder is locked (check_writable); not on Windows
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# =============================================================================
# PART I: the autoencoder, its objective, its training and evaluation: a complete program
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


class Resample(nn.Module):
    """Halve height and width (pad right and bottom by one, then a 3x3 convolution of stride 2), or with up double
    them (nearest-neighbour upsampling, then a 3x3 convolution): diffusers' Downsample2D and Upsample2D."""

    def __init__(self, channels, up=False):
        super().__init__()
        self.up, self.conv = up, nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


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
    """One resolution of the encoder or decoder: residual blocks, each followed by attention when `attention`, then an
    optional resampler (diffusers' DownEncoderBlock2D / UpDecoderBlock2D, with attention their Attn... versions; the
    key is downsamplers.0 or upsamplers.0)."""

    def __init__(self, in_channels, out_channels, n_blocks, groups, act_fn, resample=None, attention=False):
        super().__init__()
        if attention:  # registered first, as in diffusers: the state dict lists them first
            self.attentions = nn.ModuleList([Attention(out_channels, groups) for _ in range(n_blocks)])
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, act_fn)
                                      for i in range(n_blocks)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Resample(out_channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Resample(out_channels, up=True)])

    def forward(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Residual block, attention (unless mid_block_add_attention is false), residual block, at the lowest
    resolution. The attention is registered first, as in diffusers' UNetMidBlock2D: the state dict lists it first."""

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
    blocks (with attention where `attention[i]`) and a downsampler on all but the last, mid block, GroupNorm, SiLU,
    conv_out."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, act_fn="silu",
                 mid_attention=True, attention=None):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        channels = [block_out_channels[0], *block_out_channels]
        last = len(block_out_channels) - 1
        self.down_blocks = nn.ModuleList([
            Level(channels[i], channels[i + 1], layers_per_block, groups=groups, act_fn=act_fn,
                  resample=None if i == last else "down", attention=bool(attention and attention[i]))
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
    """z (B, latent, h, w) -> (B, out, f h, f w): conv_in, mid block, levels in reverse with `layers_per_block + 1`
    residual blocks (with attention where `attention[i]`, i counted in this order) and an upsampler on all but the
    last, GroupNorm, SiLU, conv_out."""

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups, act_fn="silu",
                 mid_attention=True, attention=None):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        last = len(rev) - 1  # up_blocks before mid_block: diffusers' state dict lists them first
        self.up_blocks = nn.ModuleList([
            Level(rev[max(i - 1, 0)], rev[i], layers_per_block + 1, groups=groups, act_fn=act_fn,
                  resample=None if i == last else "up", attention=bool(attention and attention[i]))
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
    diffusers' config.json, except the SD-sized defaults and the block types: None is diffusers' usual
    DownEncoderBlock2D / UpDecoderBlock2D at every level, else one name per level, Attn... for attention after each
    residual block (LDM's kl-f32, VA-VAE). Six keywords describe how the model is used, not the model: sample_size
    is the tile size of tiled encoding; scaling_factor, shift_factor, latents_mean, latents_std the latent convention
    of diffusion models (to_diffusion_latents, Part III); force_upcast says that float16 overflows in this model.
    They are kept, and exported, never applied here. FLUX.2's VAE (diffusers' AutoencoderKLFlux2) is this model with
    batch_norm_eps given: `bn` then holds the statistics of its latents patchified patch_size, for the convention of
    its diffusion model (to_diffusion_latents; not applied here either); decoder_block_out_channels, when given, are
    the decoder's widths (a narrower "small decoder")."""

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, act_fn="silu", mid_block_add_attention=True,
                 use_quant_conv=True, use_post_quant_conv=True, sample_size=512, scaling_factor=0.18215,
                 shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True, down_block_types=None,
                 up_block_types=None, decoder_block_out_channels=None, batch_norm_eps=None, batch_norm_momentum=0.1,
                 patch_size=(2, 2)):
        super().__init__()
        self.config = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in locals().items()
                       if k not in ("self", "__class__")}  # every keyword, as diffusers' config.json holds it
        levels = (layers_per_block, norm_num_groups, act_fn, mid_block_add_attention)
        attention = [[t.startswith("Attn") for t in types or ()] for types in (down_block_types, up_block_types)]
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, *levels, attention[0])
        self.decoder = Decoder(latent_channels, out_channels, decoder_block_out_channels or block_out_channels, *levels,
                               attention[1])
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        self.bn = None if batch_norm_eps is None else nn.BatchNorm2d(
            math.prod(patch_size) * latent_channels, batch_norm_eps, batch_norm_momentum, affine=False)

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


# -----------------------------------------------------------------------------
# loss: the terms of THE OBJECTIVE, then the objective itself (autoencoder_loss)


def reconstruction_loss(x, x_rec, kind="l1"):
    """Per element: |x - x_rec| (L1) or (x - x_rec)^2 (MSE), in the [-1, 1] image units."""
    return (x - x_rec).abs() if kind == "l1" else (x - x_rec).pow(2)


def nll_loss(rec, logvar):
    """LDM's negative log-likelihood with one scalar log-scale s (of a Laplace or Gaussian, up to constants):
    sum over the elements of (rec / exp(s) + s), so s is counted once per element, averaged over the batch.
    rec: (B, C, H, W) per-element reconstruction (+ perceptual) loss."""
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
    n_layers Conv(4x4) + BatchNorm + LeakyReLU with 2x, 4x, 8x the channels (stride 2, the last one
    stride 1), then Conv(4x4) to one channel. Weights N(0, 0.02), BatchNorm scales N(1, 0.02).
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
    (decoder.conv_out.weight). Returns (loss, terms): terms holds loss, rec (a mean per element), perceptual (per
    image), nll, kl (nats per image), g and lambda, averaged over the batch, detached, float32: the log's columns."""
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
# training: the recipe, one step, the loop. Part I as one program, for uint8 images x (N, 3, r, r) in a tensor:
#     autoencoder, record = train(Config(perceptual_weight=0), {"block_out_channels": (64, 128)}, x[:-64], x[-64:])
# (with the perceptual loss, on by default: perceptual=Perceptual(torchvision.models.vgg16(weights="DEFAULT").features))


def option(default, help, **argparse_keywords):
    """A field of Config: its default, and the help (and any choices or metavar) of its train option."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_keywords})


@dataclasses.dataclass
class Config:
    """A training run: LDM's recipe (configs/autoencoder/autoencoder_kl_*.yaml and LPIPSWithDiscriminator): the
    objective and the optimizers (AdamW for the autoencoder and s, Adam for the discriminator); then the loop and
    the data (which the command line reads: train() takes the data sets). Each field is a train option of the same
    name, with this help; "auto" devices and precisions are settled in train()."""
    rec_loss: str = option("l1", "the per-pixel reconstruction loss (LDM: l1)", choices=("l1", "mse"))
    perceptual_weight: float = option(1.0, "weight of the LPIPS-style VGG16 distance (LDM: 1, with LPIPS' calibrated "
                                           "channel weights: --lpips-weights; 0: off)")
    kl_weight: float = option(1e-6, "weight of the KL summed over latent elements (LDM: 1e-6)")
    learn_logvar: bool = option(True, "learn the NLL's scalar log-variance s (LDM's code leaves it at 0)")
    disc_weight: float = option(0.5, "weight of the adversarial term (LDM: 0.5; 0: no discriminator)")
    disc_start: int = option(50001, "the step from which the discriminator trains and judges (LDM: 50001; beyond "
                                    "the default --steps: a default run has no adversarial term)")
    lr: float = option(1e-4, "learning rate of both optimizers (LDM: 4.5e-6 x GPUs x batch size)")
    betas: tuple = option((0.5, 0.9), "Adam's betas, both optimizers (LDM)", metavar=("BETA1", "BETA2"))
    weight_decay: float = option(0.0, "AdamW's weight decay of the autoencoder and s (LDM: 0, Adam)")
    grad_clip: float = option(0.0, "max gradient norm of the autoencoder and s together (0: off)")
    ema: float = option(0.0, "decay of a moving average of the weights, e.g. 0.999 (0: none)", metavar="DECAY")
    precision: str = option("auto", "autocast dtype (auto: bf16 on CUDA, else fp32)", choices=("auto", "bf16", "fp32"))
    batch_size: int = option(8, "images per step, per process")
    steps: int = option(10_000, "optimizer steps")
    epochs: int = option(None, "passes over the training images, instead of --steps")
    hflip: bool = option(False, "random horizontal flips")
    compile: bool = option(False, "torch.compile the autoencoder")
    device: str = option("auto", "cuda, mps or cpu (auto: the first there is)", choices=("auto", "cpu", "cuda", "mps"))
    seed: int = option(0, "the split, the initialisation, the data order, every random draw")
    log_every: int = option(50, "a log line every N steps: the means since the one before")
    ckpt_every: int = option(1000, "a checkpoint every N steps (and at the end)")
    eval_every: int = option(1000, "a held-out evaluation every N steps (0: only at the end)")
    out: str = option(os.path.join("runs", "kl"), "the run's folder: ckpt.pt, metrics.jsonl, reconstructions.png")
    resume: bool = option(False, "continue OUT/ckpt.pt")
    data: str = option(None, "a folder of images, an .npz file (uint8 N x H x W x C 'images'), or cifar10, mnist, "
                             "celeba", required=True)
    val_data: str = option(None, "held-out images (otherwise --val-size images of --data)")
    val_size: int = option(1000, "held-out images split off --data (stratified by label when it has labels)")
    data_root: str = option("./data", "where torchvision datasets are kept")
    resolution: int = option(256, "images are resized and centre-cropped to this square")
    workers: int = option(None, "DataLoader workers (default: up to 4 for image files, 0 for arrays in memory)")


class Trainable(nn.Module):
    """What the autoencoder's optimizer trains, and DistributedDataParallel wraps: the autoencoder and the NLL's
    scalar log-variance s (frozen at 0 with --no-learn-logvar, as in LDM's code, which never hands it to Adam)."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder
        self.logvar = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        """x -> (reconstruction of a posterior sample, KL to N(0, I) per example)."""
        posterior = self.autoencoder.encode(x)
        return self.autoencoder.decode(posterior.sample()), posterior.kl()


LOG_COLUMNS = ("loss", "rec", "perceptual", "nll", "kl", "g", "lambda", "d")  # train_step's terms, as logged


def autocast(precision, device):
    """bf16 autocast for precision "bf16", or "auto" on CUDA; else float32 throughout."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=precision == "bf16" or precision == "auto" and device.type == "cuda")


def train_step(model, disc, x, step, *, opt, opt_d, cfg, perceptual=None, ema=None):
    """One step of THE OBJECTIVE on a batch x with the recipe cfg (a Config): the autoencoder's optimizer step (then
    its EMA), and from cfg.disc_start on the discriminator's. model: a Trainable, or DistributedDataParallel around
    one; in several processes the discriminator's gradients are averaged and its statistics shared here.
    Returns the terms of autoencoder_loss and the discriminator's loss d, on the device (no host sync)."""
    raw_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    disc_on = cfg.disc_weight > 0 and step >= cfg.disc_start
    # the autoencoder: decode a posterior sample, the objective (the discriminator frozen while it judges), a step
    with autocast(cfg.precision, x.device):
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
        with autocast(cfg.precision, x.device):
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


def processes(name):
    """(rank, number of processes, device) of this process, for the device name (auto: CUDA if there is one).
    torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE: each joins the process group
    (NCCL on CUDA, gloo on the CPU), also when it is the only one, so that one GPU runs the same distributed code."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)
    rank, world = 0, 1
    if "RANK" in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":  # TF32 matrix products and convolutions; the peak memory counted from here
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    return rank, world, device


def networks(cfg, model_config, device, init=None):
    """A new run's networks: the autoencoder (with the weights `init`, when given) and s in a Trainable, the
    discriminator (SyncBatchNorm under torchrun on CUDA), their optimizers, and the EMA's copy (or None). Seeded by
    cfg.seed, so that every process starts from the same weights; channels_last on CUDA."""
    torch.manual_seed(cfg.seed)
    model = Trainable(AutoencoderKL(**model_config))
    if init is not None:  # fine-tuning
        model.autoencoder.load_state_dict(init)
    model.logvar.requires_grad_(cfg.learn_logvar)
    disc = NLayerDiscriminator()
    if dist.is_initialized() and device.type == "cuda":
        disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc)
    layout = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model, disc = model.to(device, memory_format=layout), disc.to(device, memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=cfg.betas)
    ema = copy.deepcopy(model.autoencoder).requires_grad_(False) if cfg.ema else None
    return model, disc, opt, opt_d, ema


def batch_indices(n, cfg, step, *, rank, world):
    """The indices of this process's batches from `step` on, without end. Epoch e's order is the permutation of
    the n images drawn from the seed cfg.seed + e (as DistributedSampler draws it), cut to a multiple of the
    number of processes; process `rank` of `world` takes every world-th image from the rank-th on, in batches of
    cfg.batch_size, the rest dropped."""
    per_rank = n // world
    epoch, i = divmod(step, per_rank // cfg.batch_size)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        order = order[rank:per_rank * world:world]
        for j in range(i, per_rank // cfg.batch_size):
            yield order[j * cfg.batch_size:(j + 1) * cfg.batch_size].tolist()
        epoch, i = epoch + 1, 0


def to_model_input(batch, device, flip=False):
    """uint8 (B, 3, r, r) -> float in [-1, 1] on the device (channels_last on CUDA); with flip, a random half of the
    batch mirrored left-right (drawn from the global random state)."""
    x = batch.to(device, non_blocking=True).float() / 127.5 - 1
    if flip:
        x = torch.where((torch.rand(len(x)) < 0.5).to(device)[:, None, None, None], x.flip(-1), x)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def train(cfg, model_config, data, val, *, init=None, perceptual=None, features=None):
    """Train AutoencoderKL(**model_config) (from the weights `init`, when given) with THE OBJECTIVE and the recipe cfg
    on `data`, a Dataset of uint8 images (3, r, r), in one process or one per device (torchrun). Rank 0 alone logs,
    evaluates on `val` (rFID at the end with `features`, see evaluate), writes cfg.out's ckpt.pt, metrics.jsonl and
    reconstructions.png, and returns the final weights (the EMA's when kept) and evaluation; the others None."""
    if cfg.perceptual_weight > 0 and perceptual is None:
        raise ValueError("cfg.perceptual_weight > 0 needs the perceptual network (or set it to 0)")
    rank, world, device = processes(cfg.device)
    model, disc, opt, opt_d, ema = networks(cfg, model_config, device, init)
    perceptual = perceptual.to(device) if perceptual is not None else None
    final = model.autoencoder if ema is None else ema  # what is evaluated, and returned
    parts = {"model": model.autoencoder, "disc": disc, "opt": opt, "opt_d": opt_d, "ema": ema}  # the checkpoint's
    ckpt_path, log_path = os.path.join(cfg.out, "ckpt.pt"), os.path.join(cfg.out, "metrics.jsonl")
    start, saved = start_or_resume(cfg, model, parts, rank)  # the first step, the last checkpoint's (or None)
    total = cfg.epochs * (len(data) // world // cfg.batch_size) if cfg.epochs else cfg.steps
    loader = QuietLoader(data, batch_sampler=batch_indices(len(data), cfg, start, rank=rank, world=world),
                         num_workers=cfg.workers or 0, pin_memory=device.type == "cuda")
    # the discriminator stays outside DDP (it also runs, frozen, in the autoencoder's loss): train_step syncs it
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist.is_initialized() else model
    if cfg.compile:
        ddp.compile()
    sums, since, t0 = torch.zeros(len(LOG_COLUMNS), device=device), start, time.time()  # the log line in progress
    for step, batch in zip(range(start, total), loader):
        if cfg.eval_every and step % cfg.eval_every == 0 and step > 0 and rank == 0:  # the weights after `step` steps
            evaluate_and_log(final, val, cfg, step=step, out=cfg.out)
            model.train()
        torch.manual_seed(hash((cfg.seed, step, rank)))  # the step's draws from (seed, step, rank) alone: resumable
        x = to_model_input(batch, device, flip=cfg.hflip)
        terms = train_step(ddp, disc, x, step, opt=opt, opt_d=opt_d, cfg=cfg, perceptual=perceptual, ema=ema)
        sums += torch.stack([terms[name] for name in LOG_COLUMNS])  # on the device: no host sync
        done = step + 1
        log_now, save_now = done % cfg.log_every == 0 or done == total, done % cfg.ckpt_every == 0 or done == total
        if log_now or save_now:  # the means since the last line, over the processes (the only host syncs: here)
            means = finite_means(sums / (done - since), done, last_good=(ckpt_path, saved))
        if log_now:
            log_line(log_path, {"kind": "train", "step": done, **means, "logvar": model.logvar.item(), "images_per_s":
                                (done - since) * cfg.batch_size * world / (time.time() - t0)}, device, rank)
            sums, since, t0 = sums.zero_(), done, time.time()
        if save_now and rank == 0:  # all a resume needs, since every random draw follows from (seed, step, rank)
            save_checkpoint(ckpt_path, {**{k: None if v is None else v.state_dict() for k, v in parts.items()},
                                        "logvar": model.logvar.detach().cpu(), "step": done,
                                        "config": {"model": model_config, **vars(cfg)}})
        saved = done if save_now else saved
    record = evaluate_and_log(final, val, cfg, step=max(start, total), out=cfg.out, features=features) \
        if rank == 0 else None
    if dist.is_initialized():
        dist.destroy_process_group()
    return (final, record) if rank == 0 else (None, None)


def start_or_resume(cfg, model, parts, rank):
    """(The step a run begins at, its checkpoint's step): (0, None) for a new one, whose log starts empty in a new
    cfg.out; or a resumed one's (twice), its checkpoint's states loaded into its parts (an EMA that the checkpointed
    run did not keep starts at its weights) and what it logged after that checkpoint, and its evaluations at that
    step, forgotten (it will log them again: the log ends as an uninterrupted run's)."""
    log = os.path.join(cfg.out, "metrics.jsonl")
    if not cfg.resume:
        if rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            open(log, "w").close()
        return 0, None
    ckpt = torch.load(os.path.join(cfg.out, "ckpt.pt"), map_location="cpu", weights_only=True)
    for name, part in parts.items():
        if part is not None:
            settings = [{k: v for k, v in g.items() if k != "params"} for g in getattr(part, "param_groups", [])]
            part.load_state_dict(ckpt.get(name) or ckpt["model"])
            for group, ours in zip(getattr(part, "param_groups", []), settings):
                group.update(ours)  # this run's lr, betas and weight decay, not the saved ones: --lr is honoured
    model.logvar.data.copy_(ckpt["logvar"])
    if rank == 0 and os.path.exists(log):
        kept = [r for r in read_jsonl(log, "step") if r["step"] < ckpt["step"] or r["step"] == ckpt["step"]
                and r["kind"] == "train"]
        write_atomically(log, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return ckpt["step"], ckpt["step"]


def finite_means(t, step, last_good):
    """The means t of the logged terms, averaged over the processes, as {name: float} (a host sync). A run whose loss
    is not finite stops here, before a bad state is saved; last_good: (the checkpoint's path, its step or None)."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    means = dict(zip(LOG_COLUMNS, t.tolist()))
    if not all(math.isfinite(v) for v in means.values()):
        kept = f"{last_good[0]} holds the last good step, {last_good[1]}" if last_good[1] is not None \
            else "no checkpoint yet"
        raise FloatingPointError(f"the loss became {means['loss']} by step {step} ({kept}): try a lower --lr")
    return means


def log_line(path, record, device, rank):
    """A line of the training log, rank 0's: appended to metrics.jsonl, and printed (with the peak memory on CUDA)."""
    if rank != 0:
        return
    if device.type == "cuda":
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    append_jsonl(path, record)
    peak = f" | {record['peak_gib']:.2f} GiB" if "peak_gib" in record else ""
    print(f"step {record['step']:6d} | " + " | ".join(f"{k} {record[k]:.4g}" for k in [*LOG_COLUMNS, "logvar"])
          + f" | {record['images_per_s']:.1f} img/s{peak}", flush=True)


# -----------------------------------------------------------------------------
# evaluation: PSNR, SSIM, the Frechet distance (rFID), and the record of a held-out evaluation


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
    generator = torch.Generator(device).manual_seed(0)
    for x in batches:
        with autocast(precision, device):
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


def evaluate_and_log(autoencoder, images, cfg, *, step, out, features=None, batches=None):
    """evaluate() on the held-out images (a Dataset of uint8 (3, r, r); or their model inputs `batches`) with cfg's
    precision and workers, printed and appended to OUT/metrics.jsonl; and OUT/reconstructions.png, the first 8
    images above their reconstructions (decoded posterior means)."""
    device = next(autoencoder.parameters()).device
    loader = QuietLoader(images, batch_size=64, num_workers=cfg.workers or 0)
    batches = batches or (to_model_input(batch, device) for batch in loader)
    record = {"kind": "eval", "step": step, **evaluate(autoencoder, batches, cfg.precision, features)}
    print(f"eval on {record['images']:,} held-out images at step {step}: PSNR {record['psnr']:.2f} dB | SSIM "
          f"{record['ssim']:.4f} | " + (f"rFID {record['rfid']:.2f} | " if "rfid" in record else "")
          + f"KL {record['kl']:.1f} nats | latent std {record['latent_std']:.4f} | "
          f"scaling factor {record['scaling_factor']:.5f}", flush=True)
    append_jsonl(os.path.join(out, "metrics.jsonl"), record)
    x = to_model_input(torch.stack([images[i] for i in range(min(8, len(images)))]), device)
    with torch.no_grad(), autocast(cfg.precision, device):
        x_rec = autoencoder.decode(autoencoder.encode(x).mode()).float()
    grid = torchvision.utils.make_grid(torch.cat([x, x_rec]), nrow=len(x), padding=2, pad_value=1)
    write_atomically(os.path.join(out, "reconstructions.png"), torchvision.io.encode_png(to_uint8(grid).cpu()).numpy())
    return record

# -----------------------------------------------------------------------------
# plumbing, to skip on a first reading: DataLoader workers that stop quietly, files written whole or not at all


POSIX_SIGNALS = hasattr(signal, "pthread_sigmask")


class QuietLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers end on SIGTERM (a scheduler's stop, sent to the whole process group) quietly, as on
    Ctrl-C: torch's own handler kills them, and the main process then raises a traceback of its own. They are forked
    with the signal held (on POSIX), and let it in once quiet_on_sigterm has set their handler: a stop while they
    start up is quiet too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=quiet_on_sigterm, **kwargs)

    def __iter__(self):  # (where the workers start)
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if POSIX_SIGNALS else None
        try:
            return super().__iter__()
        finally:
            if POSIX_SIGNALS:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)


def quiet_on_sigterm(worker_id):
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if POSIX_SIGNALS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def write_atomically(path, data):
    """bytes -> path, written to PATH.PID.tmp (a name no user file has) and renamed: a reader never sees half a file,
    and a write that fails (a full disk) or is interrupted leaves the previous file as it was and no .tmp. Python's
    file writer reports every failed write; image encoders and torch.save writing to a path may not (on a full disk
    they left truncated files and no error), so every file this program writes is made in memory and written here."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:  # a full disk: say which file could not be written
            raise OSError(e.errno, e.strerror, path) from None
        raise


def save_checkpoint(path, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getbuffer())


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def append_jsonl(path, record):
    """One JSON line at the end of path, after cutting off an unfinished last line (a full disk, kill -9 mid-write)."""
    with open(path, "a+b") as f:  # (writes go to the end, wherever it reads)
        end = f.seek(0, os.SEEK_END)
        f.seek(max(0, end - 1))
        if end and f.read(1) != b"\n":  # rare: read it all to find the last whole line
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)
        f.write((json.dumps(record) + "\n").encode())


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def read_jsonl(path, key):
    """The records of path's whole lines: an unfinished last line (a full disk, kill -9 mid-write), and lines that are
    no JSON object with a "kind" and a number under `key` (edited by hand, say), are left out."""
    text = pathlib.Path(path).read_text(errors="replace") if os.path.exists(path) else ""
    records = []
    for line in text[:text.rfind("\n") + 1].splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict) and "kind" in r and isinstance(r.get(key), (int, float))]

# =============================================================================
# PART II: conveniences: image files and data sets, pretrained networks, weights files, the command line
# =============================================================================

# -----------------------------------------------------------------------------
# images and data sets (uint8 (3, r, r) images)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")  # what torchvision.io.decode_image reads (.webp and
# 16-bit PNGs from torchvision 0.20; before, such a file is "cannot decode FILE as an image")
TORCHVISION_DATASETS = {"cifar10": (torchvision.datasets.CIFAR10, {"train": True}),  # the training splits
                        "mnist": (torchvision.datasets.MNIST, {"train": True}),
                        "celeba": (torchvision.datasets.CelebA, {"split": "all"})}


def decode_image(path, channels=3):
    """An image file of any depth and mode (8 or 16 bits; grey, RGB, RGBA, palette) -> uint8 (channels, H, W),
    the same way in every command: colours mixed up or down to `channels`, alpha dropped, 16 bits rounded to 8,
    turned as its EXIF orientation says (as a photo is shown), an animation's first frame."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    h, w = image_size(data) or (0, 0)  # a decompression bomb is refused before decoding
    check_memory(8 * w * h, f"{path} ({h}x{w} pixels) decoded")
    mode = torchvision.io.ImageReadMode.RGB if channels == 3 else torchvision.io.ImageReadMode.GRAY
    try:
        image = torchvision.io.decode_image(torch.frombuffer(data, dtype=torch.uint8), mode=mode,
                                            apply_exif_orientation=True)
    except (RuntimeError, ValueError) as e:  # damaged, empty, or not an image
        raise UserError(f"cannot decode {path} as an image ({str(e).strip().splitlines()[0]})")
    image = image[0] if image.ndim == 4 else image  # (frames, C, H, W) of an animated GIF
    if 0 in image.shape:
        raise UserError(f"{path} is an image of {image.shape[-2]}x{image.shape[-1]} pixels")
    return image if image.dtype == torch.uint8 else (image.float() / 257).round().to(torch.uint8)  # 16 -> 8 bits


JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOF0-SOF15


def image_size(data):
    """(height, width) as a PNG, GIF or JPEG file's header states it (None when it states none, or is damaged)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])[::-1]
    if data[:3] == b"GIF" and len(data) >= 10:  # the logical screen, which every frame is decoded to
        return struct.unpack("<HH", data[6:10])[::-1]
    i = 2 if data[:2] == b"\xff\xd8" else len(data)
    while i + 9 <= len(data) and data[i] == 0xFF:  # a JPEG's segments, up to its frame header
        if data[i + 1] in JPEG_FRAME_MARKERS:
            return struct.unpack(">HH", data[i + 5:i + 9])
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return None


def write_image(x, path):
    """(C, H, W) in [-1, 1] -> PNG, or JPEG (quality 95) when the name ends in .jpg or .jpeg; atomically."""
    image, jpeg = to_uint8(x).cpu(), path.lower().endswith((".jpg", ".jpeg"))
    write_atomically(path, (torchvision.io.encode_jpeg(image, quality=95) if jpeg else
                            torchvision.io.encode_png(image)).numpy())


def fit(images, resolution):
    """uint8 (N, C, H, W) -> (N, C, r, r): the shorter side resized to r (bilinear, antialiased), the centre cut out."""
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    size = (max(resolution, round(h * resolution / min(h, w))), max(resolution, round(w * resolution / min(h, w))))
    check_memory(4 * len(images) * images.shape[1] * math.prod(size), f"resizing {h}x{w} images to {size[0]}x{size[1]}")
    out = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return out[..., top:top + resolution, left:left + resolution].round().clamp(0, 255).to(torch.uint8)


class ImageFiles(torch.utils.data.Dataset):
    """Image files, decoded (in the DataLoader's workers) when asked for."""

    def __init__(self, files, resolution):
        self.files, self.resolution = files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return fit(decode_image(self.files[i])[None], self.resolution)[0]


def load_images(spec, resolution, root):
    """--data SPEC -> (a Dataset of uint8 (3, r, r) images, their labels or None): a folder of images (searched
    recursively), an .npz file of uint8 N x H x W x C `images` (and `labels`, which stratify the held-out split),
    or a torchvision dataset's training split, kept under ROOT (downloaded when missing). Arrays are resized once,
    here; grey images repeated to three channels and alpha dropped, as decode_image does."""
    if spec in TORCHVISION_DATASETS:
        dataset = torchvision_dataset(spec, root)
        if spec == "celeba":
            folder = os.path.join(root, dataset.base_folder, "img_align_celeba")
            return ImageFiles([os.path.join(folder, f) for f in dataset.filename], resolution), None
        images, labels = np.asarray(dataset.data), np.asarray(dataset.targets)  # N x H x W (x C)
    elif os.path.isdir(spec):
        files, seen = [], set()  # linked folders too, each read once (a link to a parent folder: no loop)
        for d, folders, names in os.walk(spec, followlinks=True):
            if os.path.realpath(d) in seen:
                folders[:] = []
                continue
            seen.add(os.path.realpath(d))
            folders.sort()  # (a folder reached by two paths: the same one kept on every file system)
            files += [os.path.join(d, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
        files.sort()
        if not files:
            raise UserError(f"--data {spec}: no images ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below it")
        return ImageFiles(files, resolution), None
    elif not spec.endswith(".npz"):
        raise UserError(f"--data {spec}: not a folder, an .npz file, or one of {', '.join(TORCHVISION_DATASETS)}")
    else:
        try:
            with np.load(spec) as f:
                images, labels = f["images"], (f["labels"] if "labels" in f.files else None)
        except (KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:  # no images; not an npz (numpy: a pickle?)
            raise UserError(f"--data {spec} is not a readable .npz file of 'images' ({type(e).__name__}: {e})")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[3:] > (4,) or 0 in images.shape:
        raise UserError(f"{spec}: 'images' must be uint8 N x H x W x C (C = 1 to 4, none 0), not {images.dtype} "
                        f"{images.shape}")
    if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "biu"):
        raise UserError(f"{spec}: 'labels' must be one integer per image, {len(images)}, not {labels.dtype} "
                        f"{labels.shape}")
    images = torch.from_numpy(images.reshape(*images.shape[:3], -1)).permute(0, 3, 1, 2)
    check_memory(len(images) * 3 * resolution ** 2 * 5, f"--resolution {resolution}: resizing {len(images):,} images")
    return fit((images[:, :1].expand(-1, 3, -1, -1) if images.shape[1] <= 2 else images[:, :3]).contiguous(),
               resolution), None if labels is None else torch.as_tensor(labels.astype(np.int64))  # (any byte order)


def torchvision_dataset(name, root):
    cls, kwargs = TORCHVISION_DATASETS[name]
    try:
        try:
            return cls(root, download=False, **kwargs)
        except RuntimeError:  # "Dataset not found": fetch it
            print(f"downloading {name} into {root}")
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                return cls(root, download=True, **kwargs)
    except (RuntimeError, OSError, ValueError) as e:  # no network (URLError is an OSError), damaged files
        raise UserError(f"could not get {name} ({(str(e).strip() or type(e).__name__).splitlines()[0]}); put its files "
                        f"where torchvision.datasets.{cls.__name__}(root={root!r}) looks for them, or pass --data-root")


def check_parameters(config, what):
    """check_memory for the float32 weights of AutoencoderKL(**config), counted without memory (on the meta device);
    returns their number."""
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoencoderKL(**config).parameters())
    check_memory(4 * n, f"{what}: a model of {n:,} parameters")
    return n


def split(n, val_size, labels=None, seed=0):
    """(train indices, held-out indices): val_size items drawn with the seed, stratified when labels are given
    (each class its share, the largest remainders rounded up)."""
    if not 0 < val_size < n:
        raise UserError(f"--val-size {val_size} must be between 1 and {n - 1}, the number of images minus one")
    g = torch.Generator().manual_seed(seed)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        return perm[val_size:], perm[:val_size]
    members = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    share = torch.tensor([len(m) * val_size / n for m in members])
    take = share.floor().long()
    take[torch.argsort(share - take, descending=True)[:val_size - int(take.sum())]] += 1
    val = torch.cat([m[torch.randperm(len(m), generator=g)[:k]] for m, k in zip(members, take)]).sort().values
    return torch.from_numpy(np.setdiff1d(np.arange(n), val.numpy())), val


def datasets(cfg):
    """(training set, held-out set): --data, and --val-data or a --val-size split of --data (by --seed)."""
    data, labels = load_images(cfg.data, cfg.resolution, cfg.data_root)
    if cfg.val_data:
        return data, load_images(cfg.val_data, cfg.resolution, cfg.data_root)[0]
    train_idx, val_idx = split(len(data), cfg.val_size, labels, cfg.seed)
    return torch.utils.data.Subset(data, train_idx.tolist()), torch.utils.data.Subset(data, val_idx.tolist())

# -----------------------------------------------------------------------------
# the pretrained networks: torchvision's VGG16 for the perceptual loss, with LPIPS' channel weights; Inception-v3


def load_vgg16():
    """torchvision's ImageNet VGG16 convolutional layers (downloaded on first use)."""
    state = load_pretrained(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url, "the perceptual loss",
                            ", or train without it: --perceptual-weight 0")  # first: a missing file fails at once
    vgg = torchvision.models.vgg16(weights=None, init_weights=False)  # (no random weights drawn to be replaced)
    vgg.load_state_dict(state)
    return vgg.features


def load_lpips_weights(perceptual, path):
    """The LPIPS project's calibrated channel weights (v0.1 vgg.pth: lin0..lin4.model.1.weight, [1, C, 1, 1])."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for i, w in enumerate(perceptual.weights):
            value = state[f"lin{i}.model.1.weight"].flatten()
            if value.shape != w.shape or (value < 0).any():
                raise ValueError(f"lin{i} has {value.numel()} weights (need {w.numel()}, all >= 0)")
            w.data.copy_(value)
    except (KeyError, ValueError, RuntimeError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"--lpips-weights {path} is not LPIPS v0.1 vgg weights ({type(e).__name__}: {e})")


def inception_features(net, x):
    """rFID's features: x (B, 3, H, W) in [0, 1] -> (B, 2048) float64 from torchvision's Inception-v3, the images
    resized bilinearly to 299 x 299 and normalised with ImageNet's mean and std, as its weights expect."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
    return net((x - mean) / std).double()

# -----------------------------------------------------------------------------
# weights files: safetensors, pickled checkpoints, the checks of a state dict, export with diffusers' config.json

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def load_safetensors(path, metadata=False):
    """A .safetensors file -> {name: tensor} (and its "__metadata__" strings, with metadata=True). The format: an
    8-byte little-endian header length N, N bytes of JSON mapping each name to {"dtype", "shape", "data_offsets":
    [begin, end]} (and an optional "__metadata__"), then the tensors' bytes, offsets counted from the header's end.
    The header is checked whole before a tensor is built: size, JSON, dtypes, shapes, ranges that tile the data."""
    with open(path, "rb") as f:
        blob = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(blob)

    def refuse(why):
        raise UserError(f"{path} is not a valid safetensors file: {why}")
    n = int.from_bytes(blob[:8], "little")
    if len(blob) < 8 or n > 100_000_000 or 8 + n > len(blob) or sys.byteorder != "little":  # 100 MB: the format's cap
        refuse(f"{len(blob)} bytes, shorter than the 8-byte header length" if len(blob) < 8 else
               f"header length {n} with {len(blob) - 8} bytes after it (truncated?)")
    try:
        header = json.loads(blob[8:8 + n], object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError too; RecursionError: nested beyond reason
        refuse(f"the header is not valid JSON ({type(e).__name__})")
    if not isinstance(header, dict):
        refuse("the header is not a JSON object")
    meta, entries, end, size = header.pop("__metadata__", {}), [], 0, len(blob) - 8 - n
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        refuse("its __metadata__ is not a map of strings")
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        dtype, shape, span = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            refuse(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            refuse(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(span, list) and len(span) == 2 and all(type(o) is int for o in span)
                and 0 <= span[0] <= span[1]):
            refuse(f"tensor {name!r} has invalid data_offsets {span!r}")
        if span[1] - span[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
            refuse(f"tensor {name!r} spans {span[1] - span[0]} bytes; {dtype} {shape} needs "
                   f"{math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize}")
        entries.append((*span, name, SAFETENSORS_DTYPES[dtype], shape))
    for begin, stop, name, _, _ in sorted(entries):
        if begin != end:
            refuse(f"tensor {name!r} starts at byte {begin} of the data, not {end} ("
                   + ("overlapping)" if begin < end else "a gap before it)"))
        end = stop
    if end != size:
        refuse(f"the tensors cover {end} bytes of data, the file holds {size} "
               f"({'truncated' if end > size else 'trailing bytes'})")
    tensors = {name: torch.frombuffer(blob, dtype=dtype, count=math.prod(shape), offset=8 + n + begin).reshape(shape)
               if stop > begin else torch.empty(shape, dtype=dtype) for begin, stop, name, dtype, shape in entries}
    return (tensors, meta) if metadata else tensors


def no_duplicates(pairs):
    if len({name for name, _ in pairs}) < len(pairs):
        raise ValueError(f"duplicate names {sorted({a for a, _ in pairs if [b for b, _ in pairs].count(a) > 1})}")
    return dict(pairs)


def save_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a .safetensors file (names sorted, the header padded with spaces to a multiple of 8 bytes,
    as the safetensors package writes it); atomically."""
    header, chunks, offset = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        chunks.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        header[name] = {"dtype": next(k for k, v in SAFETENSORS_DTYPES.items() if v == t.dtype), "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(chunks[-1])]}
        offset += len(chunks[-1])
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    blob = struct.pack("<Q", len(blob)) + blob + b"".join(chunks)
    write_atomically(path, blob)


FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "config.json")  # diffusers'


def read_weights(path):
    """A weights file -> {name: tensor}: .safetensors, or a pickled .ckpt/.pt/.pth/.bin read with torch.load(
    weights_only=True), which builds tensors and plain containers and refuses anything else (a pickle can name any
    Python function to call: such a file is refused, never run); a training checkpoint's "state_dict" is taken
    out of it; a diffusers folder gives its diffusion_pytorch_model file."""
    if os.path.isdir(path):
        found = [p for p in (os.path.join(path, f) for f in FOLDER_FILES[:2]) if os.path.isfile(p)]
        if not found:
            raise UserError(f"{path} is a folder without diffusion_pytorch_model.safetensors: give the weights file")
        path = found[0]
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, KeyError, RuntimeError, EOFError, ValueError) as e:
        needs = re.search(r"GLOBAL (\S+)", str(e))
        raise UserError(f"{path} holds Python objects besides tensors ({needs[1]}); unpickling them could run code, "
                        f"so the file is refused: use a .safetensors version of these weights" if needs else
                        f"{path} is not a safetensors file or a PyTorch checkpoint ({type(e).__name__})")
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = state["model"] if isinstance(state, dict) and CHECKPOINT_KEYS <= state.keys() else state  # train's ckpt.pt
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{path} holds no state dict (a dict of tensors)")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def fit_weights(state, config, source="the state dict", *, which=None, ema=False):
    """A state dict in diffusers', LDM's or an older naming (diffusers_names; the VAE's part, vae_part) as
    AutoencoderKL(**config) names it, checked: no key missing or unexpected, every shape as the model's, every value
    finite; else a one-line error."""
    state = diffusers_names(vae_part(state, config, source, ema), config)
    fits = f"{source} does not fit this model{f' ({which})' if which else ''}"
    with torch.device("meta"):  # the names and shapes, without the memory
        expected = AutoencoderKL(**config).state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{name} is {list(t.shape)} there and {list(expected[name].shape)} here" for name, t in state.items()
             if name in expected and t.shape != expected[name].shape]
    if missing or unexpected or wrong:
        keys = [f"{len(names)} {kind}, e.g. {names[0]}"
                for kind, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise UserError(f"{fits}: {'keys ' + '; '.join(keys) if keys else wrong[0]}; pass the --preset or --config "
                        f"these weights were made for")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{source}: {name} holds NaN or infinite values; these weights cannot reconstruct anything")
        if name == "bn.running_var" and (tensor < 0).any():
            raise UserError(f"{source}: {name} holds negative variances")
    return state


def load_weights(model, state, source="the state dict", *, which=None, ema=False):
    """fit_weights, loaded into the model (returned)."""
    model.load_state_dict(fit_weights(state, model.config, source, which=which, ema=ema))
    return model


def diffusers_config(config):
    """Our config as diffusers' config.json holds it (every field of its class, AutoencoderKL or, with batch_norm_eps,
    AutoencoderKLFlux2; the latent convention too; lists for tuples)."""
    n, flux2 = len(config["block_out_channels"]), config.get("batch_norm_eps") is not None
    return {"_class_name": "AutoencoderKLFlux2" if flux2 else "AutoencoderKL",
            **{k: v for k, v in with_lists(config).items() if k not in (SD_KEYS if flux2 else FLUX2_KEYS)},
            **{key: list(config.get(key) or [plain] * n) for key, plain in BLOCK_TYPES.items()}}


def check_config_json(path, config, overwrite):
    """An export never pairs its weights with a config.json of another model (diffusers loads the two together)."""
    try:
        same = not os.path.exists(path) or json.loads(pathlib.Path(path).read_text()) == diffusers_config(config)
    except ValueError:  # not JSON, or not UTF-8
        same = False
    if not (same or overwrite):
        raise UserError(f"{path} exists and describes another model: export into another folder, or pass --overwrite")


def with_lists(d):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def export(autoencoder, path, overwrite=False, fmt="diffusers"):
    """The weights as FILE.safetensors: with diffusers' config.json beside it (diffusers format: AutoencoderKL.
    from_pretrained(its folder) loads it when FILE is diffusion_pytorch_model), or in LDM's names with the config in
    its metadata (ldm: what ComfyUI, A1111-style tools and diffusers' from_single_file load; diffusers' converter
    maps the plain levels only, not Attn... levels' attention)."""
    config, folder = diffusers_config(autoencoder.config), os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if fmt == "ldm":
        save_safetensors(to_ldm(autoencoder.state_dict(), autoencoder.config), path,
                         metadata={"format": "pt", "config": json.dumps(config)})
        return print(f"exported {path} (LDM names)")
    config_path = os.path.join(folder, "config.json")
    check_config_json(config_path, autoencoder.config, overwrite)
    save_safetensors(autoencoder.state_dict(), path, metadata={"format": "pt"})
    write_atomically(config_path, json.dumps(config, indent=2).encode())
    print(f"exported {path} and {config_path}")

# -----------------------------------------------------------------------------
# the command line: train's options are Config's fields; one check of the options; the model a command uses

DEVICES, DTYPES = ["auto", "cpu", "cuda", "mps"], {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DATA_OPTIONS = ("data", "val_data", "val_size", "data_root", "resolution", "workers", "seed")  # of train and eval
PROGRAM, CHECKPOINT_KEYS = "kl_autoencoder.py", {"model", "config", "step"}  # what load_checkpoint expects


def parse_args(argv=None):
    p = Parser(description="The Stable Diffusion KL autoencoder: reconstruct, encode, decode, convert, train, eval.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    r, n, d, c, t, e = (sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
                        for name, text in (("reconstruct", "encode and decode one image"),
                                           ("encode", "images -> latents for diffusion training (one .safetensors)"),
                                           ("decode", "latents (a file of encode, or any with 'latents') -> images"),
                                           ("convert", "a weights file to diffusers or LDM format"),
                                           ("train", "train an autoencoder (one process, or one per GPU, torchrun)"),
                                           ("eval", "evaluate a checkpoint or weights on held-out images")))
    for q in (r, n, d, c, t, e):
        add_model_options(q, source=q is not t)
        q.add_argument("--overwrite", action="store_true", help="replace existing output files")
    r.add_argument("--image", required=True)
    r.add_argument("--out", required=True, help="where to write the reconstruction (.png, or .jpg)")
    n.add_argument("--data", required=True, help="a folder of images, an .npz file, or cifar10, mnist, celeba")
    n.add_argument("--data-root", default="./data", help="where torchvision datasets are kept")
    n.add_argument("--resolution", type=positive_int, default=None,
                   help="images are resized and centre-cropped to this square (default: the config's sample_size)")
    n.add_argument("--out", required=True, help="the latents file (.safetensors)")
    n.add_argument("--sample", action="store_true", help="latents from a posterior sample (default: its mean)")
    n.add_argument("--seed", type=seed, default=0, help="of the posterior samples")
    n.add_argument("--workers", type=nonnegative_int, default=None,
                   help=Config.__dataclass_fields__["workers"].metadata["help"])
    n.add_argument("--batch-size", type=positive_int, default=8)
    d.add_argument("--latents", required=True, help="a .safetensors file with a 'latents' tensor (N, C, h, w)")
    d.add_argument("--out", required=True, help="a folder for the images (PNG)")
    d.add_argument("--batch-size", type=positive_int, default=1)
    c.add_argument("--device", default="auto", choices=DEVICES, help="as every command takes it (convert: the CPU)")
    for q in (r, n, d):
        q.add_argument("--device", default="auto", choices=DEVICES)
        q.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                       help="bf16 is for GPUs; fp16 runs in fp32 where the config says force_upcast (it overflows)")
        q.add_argument("--compile", action="store_true", help="torch.compile the encoder and the decoder themselves")
        q.add_argument("--tile", default="auto", choices=["auto", "on", "off"],
                       help=f"encode and decode in tiles of the config's sample_size, as diffusers' enable_tiling "
                            f"(auto: for images of more than {AUTO_TILE_PIXELS:,} pixels, 1024 x 1024)")
    add_config_options(t.add_argument_group("the run (Config: LDM's recipe, the loop, the data)"))
    t.set_defaults(steps=None)  # settle: 10,000 unless --epochs
    add_config_options(e.add_argument_group("data and run (default: the checkpoint's)"),
                       names=(*DATA_OPTIONS, "precision", "device"), blank=True)
    e.add_argument("--out", help="where reconstructions.png and metrics.jsonl go (default: the checkpoint's folder)")
    for q in (c, t, e):
        q.add_argument("--export", default=None, required=q is c, metavar="FILE",
                       help="the .safetensors file" if q is c else "also write the weights as a .safetensors file")
        q.add_argument("--export-format", default="diffusers", choices=["diffusers", "ldm"],
                       help="diffusers: config.json beside FILE; ldm: one file in CompVis/LDM names (ComfyUI, A1111)")
    for q in (t, e):
        q.add_argument("--fid", action="store_true", help="also rFID (needs torchvision's Inception-v3 weights)")
    return settle(p.parse_args(argv))


def add_model_options(q, source=True):
    """The model: --weights or --ckpt (train: --weights to fine-tune, and sizes), --preset or --config."""
    g = q.add_argument_group("model")
    if source:
        s = g.add_mutually_exclusive_group(required=True)
        s.add_argument("--weights", help="a .safetensors, .ckpt or .pt file in diffusers' or LDM's names (a whole "
                                         "Stable Diffusion checkpoint too), or a diffusers folder with config.json")
        s.add_argument("--ckpt", help="a checkpoint written by train (its model's config is in it)")
        g.add_argument("--ema", action="store_true", help="the EMA weights: a --ckpt's, or a --weights file's "
                                                           "model_ema.* (LDM's training checkpoints)")
    else:
        g.add_argument("--weights", help="start from these weights (fine-tuning; any file reconstruct reads)")
        for name in ("--block-out-channels", "--layers-per-block", "--latent-channels"):
            g.add_argument(name, type=positive_int, nargs="+" if name == "--block-out-channels" else None,
                           help="overrides the preset")
        g.add_argument("--lpips-weights", help="the LPIPS project's v0.1 vgg.pth: calibrated channel weights")
    g.add_argument("--preset", choices=sorted(PRESETS), help="the architecture (default: a --weights folder's "
                   "config.json, else sd); refused where it contradicts that config.json")
    g.add_argument("--config", help="a diffusers AutoencoderKL config.json (or its folder)")


def add_config_options(g, names=None, blank=False):
    """An option for each field of Config (or those named), its default (with blank: None, and nothing required;
    eval settles them) and help; the kind of each field checked as argparse parses it."""
    kinds = {"lr": positive_float, "ema": decay, "betas": decay, "seed": seed, "disc_start": nonnegative_int,
             "eval_every": nonnegative_int, "workers": nonnegative_int, int: positive_int, float: nonnegative_float}
    for f in dataclasses.fields(Config):
        if names is None or f.name in names:
            keywords = {**f.metadata, "default": None if blank else f.default,
                        "help": f.metadata["help"].replace("%", "%%")}  # (argparse formats help with %)
            keywords["required"] = keywords.get("required", False) and not blank
            if f.type is bool:
                keywords["action"] = argparse.BooleanOptionalAction
            elif f.type is not str:
                keywords.update(type=kinds.get(f.name, kinds.get(f.type)),
                                nargs=len(f.default) if f.type is tuple else None)
            g.add_argument("--" + f.name.replace("_", "-"), **keywords)


def decay(text):
    """A number in [0, 1): an EMA's decay, Adam's betas."""
    if nonnegative_float(text) >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return float(text)


def settle(args):
    """The one place where options are checked against each other and defaults that depend on others are settled
    (eval's from its checkpoint, in eval_command)."""
    train, inputs = args.command == "train", []
    for path in filter(None, (getattr(args, name, None) for name in ("weights", "ckpt", "config", "image", "data"))):
        inputs += [os.path.join(path, f) for f in FOLDER_FILES] if os.path.isdir(path) else [path]  # a folder's too
    if args.config and args.preset:
        raise UserError("--config and --preset both describe the model: pass one of them")
    if not train and args.ckpt and (args.config or args.preset):
        raise UserError("--ckpt holds its model's config: leave out --preset and --config")
    if args.command == "reconstruct":
        check_output(args.out, "--out", inputs, (".png", ".jpg", ".jpeg"), overwrite=args.overwrite)
    if args.command == "encode":
        check_output(args.out, "--out", inputs, (".safetensors",), overwrite=args.overwrite, make_folder=True)
    if args.command == "decode" and os.path.isfile(args.out):
        raise UserError(f"--out {args.out} is a file: give a folder for the images")
    if args.command == "eval" and args.weights and not args.out:
        raise UserError("eval --weights: pass --out, the folder for metrics.jsonl and reconstructions.png")
    if getattr(args, "export", None) is not None:  # and the config.json beside it, in diffusers' format
        inputs += [os.path.join(args.out, "ckpt.pt")] if train else []
        check_output(args.export, "--export", inputs, (".safetensors",), overwrite=args.overwrite, make_folder=True)
        if args.export_format == "diffusers":
            check_output(os.path.join(os.path.dirname(args.export), "config.json"), "--export's", inputs, (".json",),
                         overwrite=True, make_folder=True)
    if args.command in ("encode", "train"):
        args.workers = settled_workers(args)
    if not train:
        return args
    if args.steps is not None and args.epochs is not None:
        raise UserError("--steps and --epochs: pass one of them")
    outside_data(args.out, args.data, args.val_data, train=True)
    args.steps, args.betas, args.device = args.steps or 10_000, tuple(args.betas), get_device(args.device).type
    args.precision = args.precision if args.precision != "auto" else "bf16" if args.device == "cuda" else "fp32"
    config = model_config(args)
    if args.export and args.export_format == "diffusers":  # refused now, not after the training
        check_config_json(os.path.join(os.path.dirname(os.path.abspath(args.export)), "config.json"), config,
                          args.overwrite)
    widths = f"--block-out-channels {' '.join(map(str, config['block_out_channels']))}"
    if any(c % config["norm_num_groups"] for c in config["block_out_channels"]):
        raise UserError(f"{widths}: each must be a multiple of {config['norm_num_groups']}, the number of GroupNorm "
                        f"groups")
    check_config(config, widths)  # also: one block type per level
    check_resolution(args.resolution, config, args.disc_weight)
    check_parameters(config, widths)
    check_memory(args.batch_size * config["block_out_channels"][0] * args.resolution ** 2 * 4,
                 f"--resolution {args.resolution} with --batch-size {args.batch_size}: one batch's first activation",
                 torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else None)
    return args


def settled_workers(args):
    """--workers, or its default: up to 4 (one per core) to decode image files, none for arrays in memory."""
    if args.workers is not None:
        return args.workers
    return min(4, os.cpu_count() or 1) if os.path.isdir(args.data) or args.data == "celeba" else 0


def check_output(path, flag, inputs, extensions, *, overwrite, make_folder=False):
    """A file a command is about to write: never one of its inputs, never a folder, a kind it can write, not an
    existing file unless --overwrite says so; its folder must exist unless the command makes it."""
    folder = os.path.dirname(os.path.abspath(path))
    is_input = any(os.path.abspath(path) == os.path.abspath(i) or os.path.exists(path) and os.path.exists(i)
                   and os.path.samefile(path, i) for i in inputs if i)
    problem = ("is also an input of this command: write to another file" if is_input else
               "is a folder: give a file name" if os.path.isdir(path) else
               f"is not a {' or '.join(extensions)} file, what this command writes" if not path.lower().endswith(
                   extensions) else
               "exists: pass --overwrite to replace it, or another name" if os.path.exists(path) and not overwrite else
               f"is in a folder that does not exist, {folder}" if not make_folder and not os.path.isdir(folder) else
               f"is in {folder}, which this user may not write to (Permission denied)" if os.path.isdir(folder)
               and not os.access(folder, os.W_OK) else None)
    if problem:
        raise UserError(f"{flag} {path} {problem}")


def outside_data(out, data, val_data, train=False):
    """A run's folder may not lie in a folder of its images: its pictures would become training or held-out data; and
    train's held-out images may not be its training images."""
    if train and val_data and (val_data == data or all(map(os.path.exists, (data, val_data)))
                               and os.path.samefile(val_data, data)):
        raise UserError(f"--val-data {val_data} is --data: the held-out images would be the training images; leave it "
                        f"out (--val-size splits them off --data) or pass other images")
    for folder in (f for f in (data, val_data) if f and os.path.isdir(f)):
        inside = False
        with contextlib.suppress(ValueError):  # (Windows: paths on two drives have no common path)
            inside = os.path.commonpath([os.path.realpath(out), os.path.realpath(folder)]) == os.path.realpath(folder)
        if inside:
            raise UserError(f"--out {out} is inside the image folder {folder}: its pictures would become data; "
                            f"write elsewhere")


def check_resolution(resolution, config, disc_weight=0, latents=False):
    """A side length the model can take (with latents, encode's: latents for diffusion, patchified for FLUX.2, and no
    SSIM), and train's discriminator too."""
    patch = math.lcm(*config["patch_size"]) if latents and config["batch_norm_eps"] is not None else 1
    f = 2 ** (len(config["block_out_channels"]) - 1) * patch
    if not latents and resolution < 11:
        raise UserError(f"--resolution {resolution}: SSIM, in every evaluation, needs images of at least 11 x 11")
    if resolution % f:
        raise UserError(f"--resolution {resolution} is not a multiple of {f}, this model's downsampling factor"
                        f"{f' times its latents patch size {patch}' if patch > 1 else ''}: "
                        f"use {max(f, resolution // f * f)} or {-(-resolution // f) * f}")
    if disc_weight > 0 and resolution < 24:
        raise UserError(f"--resolution {resolution}: the PatchGAN discriminator needs at least 24; use "
                        f"--disc-weight 0 below that")


def architecture(args):
    """(AutoencoderKL keywords, where they came from): --config, else the config.json of a --weights folder or beside
    its diffusion_pytorch_model file (a --preset that contradicts it, tile size and force_upcast aside, is refused),
    else --preset (default sd)."""
    in_folder = args.weights and (os.path.isdir(args.weights) or os.path.basename(args.weights) in FOLDER_FILES[:2])
    folder = os.path.join(args.weights if os.path.isdir(args.weights) else os.path.dirname(args.weights),
                          "config.json") if in_folder and not args.config else ""
    if not args.config and not os.path.isfile(folder):
        return complete(PRESETS[args.preset or "sd"]), f"preset {args.preset or 'sd'}"
    config = complete(read_config(args.config or folder))
    if args.preset and any(v != config[k] for k, v in complete(PRESETS[args.preset]).items()
                           if k not in ("sample_size", "force_upcast")):
        raise UserError(f"--preset {args.preset} describes another model than {folder}: drop --preset")
    return config, f"--config {args.config}" if args.config else folder


def complete(config):
    """Every AutoencoderKL keyword, those not given at their defaults: what the model's .config holds."""
    return {**{k: p.default for k, p in inspect.signature(AutoencoderKL).parameters.items()}, **config}


def model_config(args):
    """train's AutoencoderKL keywords: the architecture, with explicit sizes."""
    sizes = {k: getattr(args, k) for k in ("block_out_channels", "layers_per_block", "latent_channels")}
    return {**architecture(args)[0], **{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items() if v}}


def pretrained(args):
    """(the autoencoder, on the CPU in float32, and the checkpoint or None): built from the config in --ckpt, or
    from `architecture` and loaded with the --weights."""
    if args.weights:
        config, which = architecture(args)
        model = load_weights(AutoencoderKL(**config), read_weights(args.weights), args.weights, which=which,
                             ema=args.ema)
        return model.eval(), None
    ckpt = load_checkpoint(args.ckpt)
    if args.ema and not ckpt.get("ema"):
        raise UserError(f"{args.ckpt} has no EMA weights (train with --ema DECAY)")
    model = AutoencoderKL(**ckpt["config"]["model"])
    model.load_state_dict(ckpt["ema"] if args.ema else ckpt["model"])
    return model.eval(), ckpt

# -----------------------------------------------------------------------------
# train, eval, main


def train_command(args):
    """train(): Config from the options, the checks of a new run (or of a resumed one), the networks and data."""
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    config, rank0, ckpt_path = model_config(args), os.environ.get("RANK", "0") == "0", os.path.join(cfg.out, "ckpt.pt")
    for path in (ckpt_path, os.path.join(cfg.out, "metrics.jsonl"), os.path.join(cfg.out, "reconstructions.png")):
        if rank0 and not cfg.resume and os.path.exists(path) and not args.overwrite:
            raise UserError(f"{path} exists: pass --resume to continue that run, another --out, or --overwrite")
    if rank0 and cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        if with_lists(complete(ckpt["config"]["model"])) != with_lists(config):
            raise UserError(f"{ckpt_path} holds a model {ckpt['config']['model']}, not {config}: pass its sizes, or "
                            f"another --out")
        print(f"resuming {ckpt_path} at step {ckpt['step']}")
        changed = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (was {ckpt['config'].get(k)})"
                   for k in ("lr", "betas", "weight_decay") if ckpt["config"].get(k) != getattr(cfg, k)]
        if changed:
            print(f"the optimizers continue with this run's {', '.join(changed)}", file=sys.stderr)
    if rank0:
        check_writable(cfg.out)
    init = None if not args.weights else fit_weights(read_weights(args.weights), config, args.weights,
                                                     which=architecture(args)[1])  # fine-tuning
    perceptual = Perceptual(load_vgg16()) if cfg.perceptual_weight > 0 else None  # fails early: a missing file
    if perceptual is not None and args.lpips_weights:
        load_lpips_weights(perceptual, args.lpips_weights)
    net = load_inception("cpu") if args.fid and rank0 else None
    data, val = datasets(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(data) // world < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is more than the {len(data) // world} training images of "
                        f"each of the {world} processes")
    if rank0:
        backend = (" nccl" if cfg.device == "cuda" else " gloo") if "RANK" in os.environ else ""
        n_params = check_parameters(config, "the model")
        print(f"AutoencoderKL {config['block_out_channels']}, {n_params:,} parameters; {len(data):,} training and "
              f"{len(val):,} held-out images at {cfg.resolution}x{cfg.resolution}; {world} process(es) on "
              f"{cfg.device}{backend}; " + (f"{cfg.epochs} epochs" if cfg.epochs else f"{cfg.steps:,} steps"))
    features = None if net is None else lambda x: inception_features(net.to(x.device), x)
    try:
        final, record = train(cfg, config, data, val, init=init, perceptual=perceptual, features=features)
    finally:  # also after a failure (a diverged loss, Ctrl-C): leave no process group behind
        if dist.is_initialized():
            dist.destroy_process_group()
    if final is not None and args.export:
        export(final, args.export, args.overwrite, args.export_format)
    return record


def eval_command(args):
    """evaluate() a checkpoint or a weights file on held-out images: its training run's split (or a default run's)
    unless the options say otherwise; --fid, --export."""
    model, ckpt = pretrained(args)
    saved = ckpt["config"] if ckpt else vars(Config(data=args.data))  # the held-out split of a default train run
    data_from_ckpt = ckpt is not None and args.data is None
    for key in DATA_OPTIONS:
        setattr(args, key, saved.get(key) if getattr(args, key) is None else getattr(args, key))
    if args.data is None:
        raise UserError(f"{args.ckpt or args.weights} does not say what data to evaluate on: pass --data")
    if data_from_ckpt and not os.path.exists(args.data) and args.data not in TORCHVISION_DATASETS:
        raise UserError(f"{args.ckpt} was trained on --data {args.data}, which is not there from here: pass --data")
    args.workers = settled_workers(args)
    check_resolution(args.resolution, model.config)
    device = get_device(args.device or "auto")
    if args.precision in (None, "auto"):
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    net = load_inception(device) if args.fid else None
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    outside_data(out, args.data, args.val_data)
    _, val = datasets(args)
    for name in ("metrics.jsonl", "reconstructions.png"):  # away from its own run's folder: another run's files
        theirs = args.weights or os.path.abspath(out) != os.path.dirname(os.path.abspath(args.ckpt)) \
            or os.path.basename(args.ckpt) != "ckpt.pt"  # (a checkpoint copied into another run's folder)
        if theirs and os.path.exists(os.path.join(out, name)) and not args.overwrite:
            raise UserError(f"{os.path.join(out, name)} exists: pass another --out, or --overwrite")
    check_writable(out)
    features = None if net is None else lambda x: inception_features(net, x)
    record = evaluate_and_log(model.to(device), val, args, step=ckpt["step"] if ckpt else 0, out=out,
                              features=features, batches=with_progress(val, device, args.workers))
    if args.export:
        export(model, args.export, args.overwrite, args.export_format)
    return record


def with_progress(images, device, workers):
    """The held-out images as model inputs on the device, in batches of 64, with a progress line for long work."""
    progress = Progress("held-out evaluation", len(images))
    loader = QuietLoader(images, batch_size=64, num_workers=workers)
    for batch in loader:
        yield to_model_input(batch, device)
        progress.update(len(batch))


def main(argv=None):
    previous = signal.signal(signal.SIGTERM, interrupt)  # put back on the way out: main() may be called from Python
    args = None
    try:
        args = parse_args(argv)
        commands = {"reconstruct": reconstruct, "encode": encode_command, "decode": decode_command,
                    "convert": convert, "train": train_command, "eval": eval_command}  # (the first four: Part III)
        return commands[args.command](args)
    except (UserError, OSError, FloatingPointError) as e:  # what a user can cause: a mistake, a file, a diverged run
        traceback.clear_frames(e.__traceback__)  # end its DataLoader workers now (collected later, they take 5 s)
        message = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its traceback's last line
            message = message.splitlines()[-1].split("Error: ", 1)[-1]
        print(f"kl_autoencoder.py: error: {message}", file=sys.stderr)
        sys.exit(2)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # --compile where torch.compile cannot (no C++ compiler, say)
        inner = getattr(e, "inner_exception", e)
        print(f"kl_autoencoder.py: error: --compile: torch.compile failed ({type(inner).__name__}: "
              f"{(str(inner).strip() or '?').splitlines()[0]}); run without --compile", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        kept = "the last checkpoint is kept" if args and args.command == "train" else "no file is left half-written"
        print(f"kl_autoencoder.py: interrupted; {kept}", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)  # None: not set from Python
        while LOCKED:
            os.close(LOCKED.popitem()[1])


# =============================================================================
# PART III, an appendix: Stable Diffusion files (the published families, configs, LDM names, latents, tiles)
# =============================================================================

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
    # FLUX.2 (black-forest-labs/FLUX.2-dev; diffusers' AutoencoderKLFlux2, whose defaults these are): 32 latent
    # channels, quant convs on; its diffusion latents: the mode patchified 2x2 and standardised by bn's statistics.
    "flux2": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32, sample_size=1024,
                  batch_norm_eps=1e-4),
    # small ones for CPUs and tests
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=1, latent_channels=4, sample_size=256),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=256),
}


def build(preset, **overrides):
    """The AutoencoderKL of a named preset, with keyword overrides."""
    return AutoencoderKL(**{**PRESETS[preset], **overrides})


def read_config(path):
    """A diffusers AutoencoderKL config.json (or a folder holding one) -> AutoencoderKL keywords. Every field that
    changes the model is honoured, the latent convention kept, and a field this file does not know is refused
    (diffusers' own bookkeeping, the keys starting with "_", is skipped)."""
    with open(os.path.join(path, "config.json") if os.path.isdir(path) else path, encoding="utf-8-sig") as f:
        try:  # (utf-8-sig: also a file saved with a byte-order mark)
            config = json.load(f)
        except (ValueError, RecursionError) as e:
            raise UserError(f"--config {path}: not a JSON config "
                            f"({'nested too deeply' if isinstance(e, RecursionError) else e})")
    kind = config.get("_class_name", "AutoencoderKL") if isinstance(config, dict) else None
    if kind not in ("AutoencoderKL", "AutoencoderKLFlux2"):
        raise UserError(f"--config {path} is not an AutoencoderKL config, but {config.get('_class_name', config)!r}"
                        if isinstance(config, dict) else f"--config {path}: not a JSON object")
    config = {**PRESETS["flux2"], **config} if kind == "AutoencoderKLFlux2" else config  # (its class's defaults)
    widths = config.get("block_out_channels", complete({})["block_out_channels"])
    levels = len(widths) if isinstance(widths, (list, tuple)) else 0  # (check_config names a bad one)
    for key, plain in BLOCK_TYPES.items():  # one name per level; all without attention: None, as in the presets
        if not isinstance(config.get(key, []), list):
            raise UserError(f"--config {path}: {key} must be a list of block names, one per level")
        if config.get(key) in ([plain] * levels, None):
            config.pop(key, None)
    names = [k for k in inspect.signature(AutoencoderKL).parameters if kind != "AutoencoderKL" or k not in FLUX2_KEYS]
    unknown = sorted(k for k in config if k not in names and not k.startswith("_"))
    if unknown:
        raise UserError(f"--config {path}: unknown {kind} fields {', '.join(unknown)}")
    config = check_config({k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names},
                          f"--config {path}", flux2=kind == "AutoencoderKLFlux2")
    check_parameters(complete(config), f"--config {path}")
    return config


BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}  # without attention
FLUX2_KEYS = ("decoder_block_out_channels", "batch_norm_eps", "batch_norm_momentum", "patch_size")  # its own fields
SD_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast")  # AutoencoderKL's only


def check_config(config, source, flux2=False):
    """AutoencoderKL keywords (some or all) that a model can be built from and used with, else a one-line error that
    names the field: counts are positive integers, widths multiples of norm_num_groups, flags true or false, the
    scaling and shift finite (the scaling > 0), per-channel statistics one finite number per latent channel; FLUX.2's
    fields (with flux2, those of an AutoencoderKLFlux2 config, which needs batch_norm_eps) in range."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 2 ** 16

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    full = complete(config)
    groups, channels = full["norm_num_groups"], full["latent_channels"]
    levels = len(full["block_out_channels"]) if isinstance(full["block_out_channels"], tuple) else 0

    def widths(v):
        return isinstance(v, tuple) and v and all(count(w) and w % groups == 0 for w in v)
    rules = {**dict.fromkeys(("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                              "sample_size"), (count, "a positive integer")),
             "block_out_channels": (widths, f"a list of positive multiples of norm_num_groups ({groups})"),
             "batch_norm_eps": (lambda v: v is None and not flux2 or number(v) and v > 0,
                                "a finite number > 0" + " or null" * (not flux2)),
             "decoder_block_out_channels": (
                 lambda v: v is None or full["batch_norm_eps"] is not None and widths(v) and len(v) == levels,
                 f"null, or (FLUX.2's, with batch_norm_eps) one multiple of norm_num_groups ({groups}) per level"),
             "batch_norm_momentum": (lambda v: number(v) and 0 <= v <= 1, "a number in [0, 1]"),
             "patch_size": (lambda v: isinstance(v, tuple) and len(v) == 2 and all(count(p) and p <= 16 for p in v),
                            "two positive integers up to 16"),
             "act_fn": (lambda v: isinstance(v, str) and v in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}"),
             **dict.fromkeys(("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv", "force_upcast"),
                             (lambda v: isinstance(v, bool), "true or false")),
             "scaling_factor": (lambda v: number(v) and v > 0, "a finite number > 0"),
             "shift_factor": (lambda v: v is None or number(v), "a finite number or null"),
             "latents_mean": (lambda v: v is None or isinstance(v, tuple) and len(v) == channels and all(
                 map(number, v)), f"null or {channels} finite numbers, one per latent channel"),
             "latents_std": (lambda v: v is None or isinstance(v, tuple) and len(v) == channels and all(
                 number(s) and s > 0 for s in v), f"null or {channels} finite numbers > 0, one per latent channel"),
             **{key: (lambda v, names=(plain, "Attn" + plain): v is None or isinstance(v, tuple) and len(v) == len(
                 full["block_out_channels"]) and all(t in names for t in v), f"one of {plain}, Attn{plain} per level")
                for key, plain in BLOCK_TYPES.items()}}
    for key, (ok, what) in rules.items():
        if not ok(full[key]):
            raise UserError(f"{source}: {key} {json.dumps(full[key])[:60]} must be {what}")
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


def ldm_names(config):
    """{diffusers name: LDM name} for every weight of an AutoencoderKL with this config."""
    with torch.device("meta"):  # the names without the memory
        names = list(AutoencoderKL(**config).state_dict())
    levels, table = len(config["block_out_channels"]), {}
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


TRAINING_LEFTOVERS = ("loss.", "model_ema.loss", "model_ema.decay", "model_ema.num_updates")  # LDM's EMA copies the
# loss's parameters too


def vae_part(state, config, source, ema=False):
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
        ldm = {"model_ema." + name.replace(".", ""): name for name in ldm_names(config).values()}
        state = {ldm.get(k, k): v for k, v in state.items() if k in copies}
    if ignored or copies:
        kinds = ", ".join(sorted({".".join(k.split(".")[:2]) for k in ignored}))
        print(f"{source}: " + (f"ignored {len(ignored)} tensors of its training ({kinds}); " if ignored else "")
              + f"loaded its {'EMA weights' if ema else 'weights'}"
              + (f", not the EMA's ({len(copies)} tensors; --ema loads them)" if copies and not ema else ""),
              file=sys.stderr)
    return {k: v for k, v in state.items() if k not in ignored and (ema or k not in copies)}


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

# -----------------------------------------------------------------------------
# latents for diffusion models, and large images in tiles


def to_diffusion_latents(z, config, bn=None):
    """The latents a diffusion model works on: z_model = (z - shift_factor) * scaling_factor, or, where the config
    has per-channel latents_mean and latents_std, (z - latents_mean) * scaling_factor / latents_std (the
    conventions of diffusers' SD3/Flux and SDXL pipelines); for FLUX.2, given its model's bn, z patchified and
    standardised: (patchify(z) - bn.running_mean) / sqrt(bn.running_var + bn.eps) (diffusers' Flux2Pipeline)."""
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


def tiled_encode(model, x):
    """The posterior q(z|x) from tiles of the config's sample_size (as diffusers' encode with enable_tiling); from
    the whole of x when it fits one tile."""
    size = model.config["sample_size"]
    if max(x.shape[2:]) <= size:
        return model.encode(x)
    return DiagonalGaussianDistribution(tiled(lambda t: model.encode(t).parameters, x, size,
                                              size // model.downsampling_factor))


def tiled_decode(model, z):
    """The image of z decoded in tiles of sample_size / f latent pixels (as diffusers), whole when it fits one."""
    size = model.config["sample_size"] // model.downsampling_factor
    return model.decode(z) if max(z.shape[2:]) <= size else tiled(model.decode, z, size, model.config["sample_size"])

# -----------------------------------------------------------------------------
# reconstruct, encode, decode, convert


def inference_setup(args, model):
    """(device, dtype) for reconstruct/encode/decode, with the model moved there (and compiled with --compile). float16
    is replaced by float32 where the config says force_upcast (float16 overflows in that model: SDXL's); else the
    float32 weights are kept in model.float32_weights, for float32_if_it_overflows (weights beyond float16's range
    are infinite in float16)."""
    device, dtype = get_device(args.device), DTYPES[args.dtype]
    if dtype == torch.float16 and model.config["force_upcast"]:
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
    for the rest of the command and run repeated, with a line that says so, whatever force_upcast says (SDXL-like
    VAEs overflow in float16: the black images). run takes the dtype to cast its input to."""
    dtype = next(model.parameters()).dtype
    out = run(dtype)
    values = out.parameters if isinstance(out, DiagonalGaussianDistribution) else out  # (a posterior: its moments)
    if dtype == torch.float16 and not torch.isfinite(values).all():
        print(f"--dtype fp16: {what} overflowed in float16 (NaN or infinite values); running in fp32 from here",
              file=sys.stderr)
        model.float().load_state_dict(model.float32_weights)
        out = run(torch.float32)
    return out


def use_tiles(args, pixels):
    return args.tile == "on" or (args.tile == "auto" and pixels > AUTO_TILE_PIXELS)


@torch.no_grad()
def reconstruct(args):
    model, _ = pretrained(args)
    f = model.downsampling_factor
    x = decode_image(args.image, model.config["in_channels"])[None].float() / 127.5 - 1
    h, w = x.shape[2:]
    if h < f or w < f or h % f or w % f:
        raise UserError(f"{args.image} is {h}x{w} (height x width), smaller than this model's downsampling factor "
                        f"{f}: it needs sides of at least {f}" if h < f or w < f else
                        f"{args.image} is {h}x{w} (height x width); this model needs sides that are multiples of {f}, "
                        f"e.g. {h // f * f}x{w // f * f} or {-(-h // f) * f}x{-(-w // f) * f}: crop or pad it")
    device, dtype = inference_setup(args, model)
    tile = use_tiles(args, h * w)
    check_memory(0 if tile else 3 * model.config["block_out_channels"][0] * h * w * dtype.itemsize,
                 f"{args.image} ({h}x{w}) with --tile off: the first level's activations",
                 torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    posterior = float32_if_it_overflows(model, lambda d: (tiled_encode if tile else AutoencoderKL.encode)(
        model, x.to(device=device, dtype=d)), "the encoder")
    out = finite(float32_if_it_overflows(model, lambda d: (tiled_decode if tile else AutoencoderKL.decode)(
        model, posterior.mode().to(d)), "the decoder"), "the reconstructed pixels")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    write_image(out[0], args.out)
    quality = psnr((to_uint8(out).float() / 255).cpu(), to_uint8(x).float() / 255).item()
    tiles = ", tiled" if tile and max(h, w) > model.config["sample_size"] else ""  # encode() tiles larger images only
    print(f"latent {list(posterior.mean.shape)} (B, C, H/{f}, W/{f}) | PSNR {quality:.2f} dB | {seconds:.3f} s on "
          f"{device} ({str(next(model.parameters()).dtype).split('.')[1]}{tiles}) | wrote {args.out}")
    return quality


@torch.no_grad()
def encode_command(args):
    """--data -> one safetensors file: `latents` = to_diffusion_latents(z) (z the posterior mean, or a sample with
    --sample), what a diffusion model trains on, and the posterior's `mean` and `logvar` (unscaled), all float32
    (N, C, h, w); `labels` when the data has them. The metadata holds the model's config (the scaling and shift
    used), how the latents were made, and the images' names in order."""
    check_writable(os.path.dirname(os.path.abspath(args.out)))  # and locked: one encode at a time writes there
    model, _ = pretrained(args)
    if model.config["in_channels"] != 3:
        raise UserError(f"encode reads RGB images; this model takes {model.config['in_channels']} channels")
    resolution = args.resolution or model.config["sample_size"]
    check_resolution(resolution, model.config, latents=True)
    images, labels = load_images(args.data, resolution, args.data_root)
    c, h = model.config["latent_channels"], resolution // model.downsampling_factor
    check_memory(len(images) * c * h * h * 4 * 3, f"encoding {len(images):,} images at {resolution}")
    bn = copy.deepcopy(model.bn)  # FLUX.2's statistics, kept in float32
    device, _ = inference_setup(args, model)
    generator, progress, parts = torch.Generator(device).manual_seed(args.seed), Progress("encoding", len(images)), []
    for batch in QuietLoader(images, batch_size=args.batch_size, num_workers=args.workers):
        posterior = float32_if_it_overflows(model, lambda d: (
            tiled_encode if use_tiles(args, resolution ** 2) else AutoencoderKL.encode)(
            model, to_model_input(batch, device).to(d)), "the encoder")
        z = finite(posterior.sample(generator) if args.sample else posterior.mode(), "the latents")
        parts.append([t.float().cpu() for t in (to_diffusion_latents(z.float(), model.config, bn), posterior.mean,
                                                posterior.logvar)])
        progress.update(len(batch))
    tensors = {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(("latents", "mean", "logvar"))}
    if labels is not None:
        tensors["labels"] = labels
    if bn is not None:  # the statistics the latents were standardised with (decode takes them back with them)
        tensors.update({f"bn.{k}": getattr(bn, k).float() for k in ("running_mean", "running_var")})
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
    file's metadata when it has them, else the model's) and decoded -> OUT/<name>.png for each (000000.png, ...
    when the names are missing, leave OUT, or are not one per image)."""
    latents, config = read_latents(args.latents)
    model, _ = pretrained(args)
    bn, channels = copy.deepcopy(model.bn), model.config["latent_channels"]  # FLUX.2's: patchified, in float32
    channels *= 1 if bn is None else math.prod(model.config["patch_size"])
    if latents.shape[1] != channels:
        raise UserError(f"{args.latents}: latents have {latents.shape[1]} channels, this model's {channels}")
    names, stems, stats = config.pop("names", None), [], config.pop("bn", None)
    if bn is not None and stats is not None:  # the file's own statistics, as its scaling factor wins for SD's
        bn.running_mean.copy_(stats["running_mean"])
        bn.running_var.copy_(stats["running_var"])
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        stems = [os.path.normpath(os.path.splitext(n)[0]) for n in names]
    if not (len(stems) == len(latents) == len({s.lower() for s in stems}) and all(  # one each, inside --out, that
            not os.path.isabs(s) and not s.startswith("..") and "\0" not in s  # the file system can name
            and max(len(os.fsencode(part)) for part in s.split(os.sep)) < 250 for s in stems)):
        stems = [f"{i:06d}" for i in range(len(latents))]  # (a.png and a.jpg would both become a.png)
    check_writable(args.out)  # and locked: one decode at a time writes there
    paths = [os.path.join(args.out, s + ".png") for s in stems]
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        raise UserError(f"{existing[0]} exists ({len(existing)} of the images): pass --overwrite, or another --out")
    device, _ = inference_setup(args, model)
    z = from_diffusion_latents(latents, check_config({**model.config, **config}, f"{args.latents}'s metadata"), bn)
    tile = use_tiles(args, z.shape[2] * z.shape[3] * model.downsampling_factor ** 2)
    progress = Progress("decoding", len(z))
    for i in range(0, len(z), args.batch_size):
        x = finite(float32_if_it_overflows(model, lambda d: (tiled_decode if tile else AutoencoderKL.decode)(
            model, z[i:i + args.batch_size].to(device, d)), "the decoder"), "the decoded images").float()
        for image, path in zip(x, paths[i:i + args.batch_size]):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_image(image, path)
        progress.update(len(x))
    print(f"decoded {len(z):,} latents into {args.out}")


def read_latents(path):
    """(latents float32, the latent convention and image names in its metadata, and FLUX.2's bn statistics when it
    has them) of a latents file."""
    tensors, meta = load_safetensors(path, metadata=True)
    if "latents" not in tensors or tensors["latents"].ndim != 4 or 0 in tensors["latents"].shape:
        raise UserError(f"{path} has no 'latents' tensor of shape (N, C, h, w), none 0")
    try:
        saved, names = json.loads(meta.get("config", "{}")), json.loads(meta.get("names", "null"))
    except ValueError:
        raise UserError(f"{path}: its metadata 'config' or 'names' is not JSON")
    if not isinstance(saved, dict):
        raise UserError(f"{path}: its metadata 'config' is not a JSON object")
    keys = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
    convention = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in keys}
    stats = {k: tensors[f"bn.{k}"].float() for k in ("running_mean", "running_var") if f"bn.{k}" in tensors}
    if stats and not (len(stats) == 2 and all(t.shape == tensors["latents"].shape[1:2] and torch.isfinite(t).all()
                                              for t in stats.values()) and (stats["running_var"] >= 0).all()):
        raise UserError(f"{path}: bn.running_mean and bn.running_var must be one finite number per latent channel "
                        f"each (the variances >= 0)")
    latents = finite(tensors["latents"].float(), f"{path}: its latents")
    return latents, {**convention, "names": names, "bn": stats or None}


def finite(t, what):
    """t, if all its values are finite; else a one-line error (a flat one-colour image is no result)."""
    if not torch.isfinite(t).all():
        raise UserError(f"{what} hold NaN or infinite values" + ("; the weights overflow in this precision: try "
                                                                  "--dtype fp32" if t.dtype != torch.float32 else ""))
    return t


def convert(args):
    export(pretrained(args)[0], args.export, args.overwrite, args.export_format)

# =============================================================================
# Shared with vae.py: each file stands alone, so these are written in both; a test keeps them identical.
# =============================================================================


class UserError(Exception):
    """A mistake in how the program was called: main() prints it as one line and exits with 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we want one line, like our own errors
        raise UserError(f"{message} (see --help)")


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


def get_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device here (torch.cuda.is_available() is False); "
                        "use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this PyTorch has no MPS (Apple GPU) backend here; use --device cpu or auto")
    return torch.device(name)


def check_memory(needed, what, have=None):
    """A one-line error instead of an allocation that runs until the machine gives up: work that certainly needs
    more bytes than the machine has (`have`, or its RAM)."""
    have = have or (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else math.inf)
    if needed > have:
        raise UserError(f"{what} needs at least {needed / 2 ** 30:,.1f} GiB, more than this machine's "
                        f"{have / 2 ** 30:,.1f} GiB")


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


INCEPTION = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1


def load_inception(device):
    """torchvision's ImageNet Inception-v3 without its classifier: images -> 2048-d pool features."""
    state = load_pretrained(INCEPTION.url, "--fid")  # first: a missing or refused file fails before any work
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    net.load_state_dict(state)
    net.fc = nn.Identity()
    return net.eval().to(device)


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


LOCKED = {}  # folder -> the descriptor by which this process holds its lock


def check_writable(folder):
    """Make `folder` if need be, check that a file can be written in it before any long work starts (an OSError, say
    "Permission denied", is one line from main), and lock it: a second run into the folder while this one works is
    refused. The system lets the lock go when the process ends (kill -9 too); main lets it go when it returns."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--out {folder} is a file, not a folder: pass a folder")
    os.makedirs(folder, exist_ok=True)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:  # "Permission denied" (a read-only folder): name the folder, not the probe's random name
        raise OSError(e.errno, e.strerror, folder) from None
    key = os.path.realpath(folder)
    if fcntl is not None and key not in LOCKED:
        LOCKED[key] = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(LOCKED[key], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # BlockingIOError: held; others (Lustre, some NFS mounts): no locks there, run without
            os.close(LOCKED.pop(key))
            if isinstance(e, BlockingIOError):
                raise UserError(f"{folder} is in use by another run right now: wait for it to end, or write elsewhere")


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


def interrupt(signum, frame):
    """SIGTERM (kill, a job scheduler's stop) ends the program the way Ctrl-C does: one line, exit 130."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
