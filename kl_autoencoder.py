"""
The KL autoencoder of Stable Diffusion (Rombach et al. 2022, "kl-f8"), in one file, to be read top to bottom: the
model, whose weights are those of diffusers' AutoencoderKL key for key (a diffusers state dict loads with strict=True),
LDM's objective and recipe, its training on one GPU or many, and its evaluation.

    python kl_autoencoder.py train --data images/ --preset sd --resolution 256 --out runs/kl
    torchrun --nproc_per_node 8 kl_autoencoder.py train --data images/ ...    # one process per GPU
    python kl_autoencoder.py eval --ckpt runs/kl/ckpt.pt --fid --export vae/diffusion_pytorch_model.safetensors
    python kl_autoencoder.py reconstruct --weights vae/ --image in.png --out out.png
    python kl_autoencoder.py train --help                                     # every option: Config's fields

(Stable Diffusion and FLUX VAE files of every family, LDM's names, latents for diffusion models, tiles: sd_vae.py.)

An image x (values in [-1, 1]) is encoded to a diagonal Gaussian posterior q(z|x) over a latent with `latent_channels`
channels and 1/f of the image's height and width (f = 2^(levels - 1), 8 for SD); decoding z (the posterior mean, or a
sample) gives the reconstruction x_rec. Diffusion models work on z * scaling_factor, a number chosen so that the scaled
latents have unit standard deviation.

THE OBJECTIVE (LDM's; sums over image values (C x H x W) and latent elements, means over the batch), one step:

    autoencoder    loss = nll + kl_weight * KL(q(z|x) || N(0, I)) + disc_weight * lambda * g
                   nll  = sum_{c,h,w} [(|x - x_rec| + perceptual_weight * P(x, x_rec)) / exp(s) + s]
                   g    = -mean D(x_rec),   lambda = clamp(||grad_L nll|| / (||grad_L g|| + 1e-4), 0, 1e4)
    discriminator  d    = 1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))

with x_rec the decoding of a sample z ~ q(z|x), P the LPIPS-style perceptual distance of the image (the same for each
of its values), s a scalar log-scale (LDM's "logvar": learned with --learn-logvar, the default; LDM's code leaves it at
0), L the decoder's last layer (decoder.conv_out), D a PatchGAN discriminator, and both adversarial terms off before
--disc-start (LDM: step 50,001, beyond a default run's 10,000 steps). A learned s divides the reconstruction terms by
exp(s), which weights the KL by kl_weight * exp(s) relative to them. With terms averaged over elements instead of
summed, the same balance needs kl_weight * N_latent / N_values (1e-6 -> about 2.08e-8 at 3 x 256 x 256, f = 8, 4 latent
channels).

Part I uses nothing defined after it: copied as one block, it is a program. Used so, on CIFAR-10 (a few minutes on a
CPU; without the perceptual loss, which needs VGG16's weights, and the adversarial term):

    import torch, torchvision
    from kl_autoencoder import Config, train  # or Part I, pasted above
    images = torch.from_numpy(torchvision.datasets.CIFAR10("data", download=True).data).permute(0, 3, 1, 2)
    cfg = Config(steps=100, batch_size=16, perceptual_weight=0, disc_weight=0, out="runs/part-one")
    autoencoder, record = train(cfg, {"block_out_channels": (32, 64), "layers_per_block": 1}, images[:-500],
                                images[-500:])
    print(record)  # the 500 held-out images: PSNR, SSIM, KL, latent std, scaling factor

Part II holds the conveniences: image files and data sets, the pretrained networks, weights files (safetensors, a
diffusers folder, export), the command line generated from Config, train, eval and reconstruct, main, and the helpers
vae.py writes too.
"""

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import pathlib
import pickle
import struct
import sys
import time
import traceback
import zipfile

try:
    import fcntl  # POSIX: a run locks its folder (lock_folder); not on Windows
except ImportError:
    fcntl = None

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF

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
    """Encoder -> quant_conv -> q(z|x);  z -> post_quant_conv -> Decoder: diffusers' AutoencoderKL, its keywords and
    their defaults as in its config.json, but for SD-sized defaults and the block types: None is DownEncoderBlock2D /
    UpDecoderBlock2D at every level, else one name per level, Attn... for attention after each residual block (LDM's
    kl-f32, VA-VAE). Five keywords describe how the model is used, not the model, and are kept (and exported) but not
    applied here (sd_vae.py does): sample_size, the tile size of tiled encoding; scaling_factor, shift_factor,
    latents_mean and latents_std, the latent convention of diffusion models; force_upcast (float16 overflows in it)."""

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, act_fn="silu", mid_block_add_attention=True,
                 use_quant_conv=True, use_post_quant_conv=True, sample_size=512, scaling_factor=0.18215,
                 shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True, down_block_types=None,
                 up_block_types=None):
        super().__init__()
        self.config = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in locals().items()
                       if k not in ("self", "__class__")}  # every keyword, as diffusers' config.json holds it
        levels = (layers_per_block, norm_num_groups, act_fn, mid_block_add_attention)
        attention = [[t.startswith("Attn") for t in types or ()] for types in (down_block_types, up_block_types)]
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, *levels, attention[0])
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, *levels, attention[1])
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
# training: the recipe, one step, the loop (with the perceptual loss, on by default, train() takes a perceptual
# network: Perceptual(torchvision.models.vgg16(weights="DEFAULT").features); Part II loads it safely)


def option(default, help, **argparse_keywords):
    """A field of Config: its default, and the help (and any choices or metavar) of its train option."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_keywords})


@dataclasses.dataclass
class Config:
    """A training run: LDM's recipe (configs/autoencoder/autoencoder_kl_*.yaml and LPIPSWithDiscriminator), the
    objective and the optimizers (AdamW for the autoencoder and s, Adam for the discriminator); then the loop. Each
    field is a train option of the same name, with this help; "auto" devices and precisions are settled in train()."""
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


def networks(cfg, model_config, device, init=None, model_class=None):
    """A new run's networks: the autoencoder (with the weights `init`, when given) and s in a Trainable, the
    discriminator (SyncBatchNorm under torchrun on CUDA), their optimizers, and the EMA's copy (or None). Seeded by
    cfg.seed, so that every process starts from the same weights; channels_last on CUDA."""
    torch.manual_seed(cfg.seed)
    model = Trainable((model_class or AutoencoderKL)(**model_config))
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


def train(cfg, model_config, data, val, *, init=None, perceptual=None, features=None, model_class=None):
    """Train AutoencoderKL(**model_config) (or model_class's model) from the weights `init`, when given, with THE
    OBJECTIVE and the recipe cfg on `data`, a Dataset of uint8 images (3, r, r), in one process or one per device
    (torchrun). Rank 0 alone logs, evaluates on `val` (rFID at the end with `features`, see evaluate), writes
    cfg.out's ckpt.pt, metrics.jsonl and reconstructions.png, and returns the final weights (the EMA's when kept) and
    evaluation; the others None."""
    if cfg.perceptual_weight > 0 and perceptual is None:
        raise ValueError("cfg.perceptual_weight > 0 needs the perceptual network (or set it to 0)")
    rank, world, device = processes(cfg.device)
    model, disc, opt, opt_d, ema = networks(cfg, model_config, device, init, model_class)
    perceptual = perceptual.to(device) if perceptual is not None else None
    final = model.autoencoder if ema is None else ema  # what is evaluated, and returned
    parts = {"model": model.autoencoder, "ema": ema, "opt": opt,  # the checkpoint's; without an adversarial term,
             **({"disc": disc, "opt_d": opt_d} if cfg.disc_weight > 0 else {})}  # no discriminator
    ckpt_path, log_path = os.path.join(cfg.out, "ckpt.pt"), os.path.join(cfg.out, "metrics.jsonl")
    start = start_or_resume(cfg, model, parts, rank)
    total = cfg.epochs * (len(data) // world // cfg.batch_size) if cfg.epochs else cfg.steps
    loader = torch.utils.data.DataLoader(data, batch_sampler=batch_indices(len(data), cfg, start, rank=rank,
                                         world=world), num_workers=cfg.workers or 0, pin_memory=device.type == "cuda")
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
            means = finite_means(sums / (done - since), done)
        if log_now:
            log_line(log_path, {"kind": "train", "step": done, **means, "logvar": model.logvar.item(), "images_per_s":
                                (done - since) * cfg.batch_size * world / (time.time() - t0)}, device, rank)
            sums, since, t0 = sums.zero_(), done, time.time()
        if save_now and rank == 0:  # all a resume needs, since every random draw follows from (seed, step, rank)
            save_checkpoint(ckpt_path, {**{k: None if v is None else v.state_dict() for k, v in parts.items()},
                                        "logvar": model.logvar.detach().cpu(), "step": done,
                                        "config": {"model": model_config, **vars(cfg)}})
    record = evaluate_and_log(final, val, cfg, step=max(start, total), out=cfg.out, features=features) \
        if rank == 0 else None
    if dist.is_initialized():
        dist.destroy_process_group()
    return (final, record) if rank == 0 else (None, None)


def start_or_resume(cfg, model, parts, rank):
    """The step a run begins at: 0 for a new one, whose log starts empty in cfg.out; or a resumed one's, its
    checkpoint's states loaded into its parts (an EMA that the checkpointed run did not keep starts at its weights), and
    what it logged after that checkpoint (its evaluations at that step too) forgotten: it will log them again, so that
    the log ends as an uninterrupted run's."""
    log = os.path.join(cfg.out, "metrics.jsonl")
    if not cfg.resume:
        if rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            open(log, "w").close()
        return 0
    ckpt = torch.load(os.path.join(cfg.out, "ckpt.pt"), map_location="cpu", weights_only=True)
    for name, part in parts.items():
        if part is not None and (ckpt.get(name) is not None or name == "ema"):
            settings = [{k: v for k, v in g.items() if k != "params"} for g in getattr(part, "param_groups", [])]
            part.load_state_dict(ckpt.get(name) or ckpt["model"])
            for group, ours in zip(getattr(part, "param_groups", []), settings):
                group.update(ours)  # this run's lr, betas and weight decay, not the saved ones: --lr is honoured
    model.logvar.data.copy_(ckpt["logvar"])
    if rank == 0:
        kept = [r for r in read_jsonl(log) if r["step"] < ckpt["step"] or r["step"] == ckpt["step"]
                and r["kind"] == "train"]
        write_atomically(log, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return ckpt["step"]


def finite_means(t, step):
    """The means t of the logged terms, averaged over the processes, as {name: float} (a host sync). A run whose loss
    is not finite stops here, before a bad state is saved: the last checkpoint is the last good one."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    means = dict(zip(LOG_COLUMNS, t.tolist()))
    if not all(math.isfinite(v) for v in means.values()):
        raise FloatingPointError(f"the loss became {means['loss']} by step {step}; the last checkpoint in the run's "
                                 f"folder is the last good one: try a lower --lr")
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

    Tr((S1 S2)^{1/2}) is the sum of the square roots of the eigenvalues of S1^{1/2} S2 S1^{1/2}, a symmetric positive
    semi-definite matrix with the same spectrum as S1 S2; both steps use symmetric eigendecompositions in float64, so
    the result is real and finite even for singular covariances (fewer samples than dimensions). Returns a float.
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


def evaluate_and_log(autoencoder, images, cfg, *, step, out, features=None):
    """evaluate() on the held-out images (a Dataset of uint8 (3, r, r)) with cfg's precision and workers, printed and
    appended to OUT/metrics.jsonl; and OUT/reconstructions.png, the first 8 images above their reconstructions
    (decoded posterior means)."""
    device = next(autoencoder.parameters()).device
    loader = torch.utils.data.DataLoader(images, batch_size=64, num_workers=cfg.workers or 0)
    batches = (to_model_input(batch, device) for batch in loader)
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
# files: written whole or not at all


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def write_atomically(path, data):
    """bytes -> path, written to PATH.PID.tmp and renamed: a reader never sees half a file, and a write that fails or is
    interrupted leaves the earlier file as it was. Every file this program writes is made in memory and written here."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def save_checkpoint(path, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getbuffer())


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def append_jsonl(path, record):
    """One JSON line at the end of path."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# A deliberate copy of vae.py's (each file stands alone); a test keeps the two identical.
def read_jsonl(path):
    """The records of path's whole lines: an unfinished last line (kill -9 mid-write) is left out."""
    text = pathlib.Path(path).read_text() if os.path.exists(path) else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]

# =============================================================================
# PART II: conveniences: image files and data sets, pretrained networks, weights files, the command line
# =============================================================================

# -----------------------------------------------------------------------------
# images and data sets (uint8 (3, r, r) images)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp")  # what torchvision.io.decode_image reads
TORCHVISION_DATASETS = {"cifar10": (torchvision.datasets.CIFAR10, {"train": True}),  # the training splits
                        "mnist": (torchvision.datasets.MNIST, {"train": True}),
                        "celeba": (torchvision.datasets.CelebA, {"split": "all"})}


def decode_image(path, channels=3):
    """An image file of any depth and mode (8 or 16 bits; grey, RGB, RGBA, palette) -> uint8 (channels, H, W), the same
    way in every command: colours mixed up or down to `channels`, alpha dropped, 16 bits rounded to 8, turned as its
    EXIF orientation says (as a photo is shown), an animation's first frame."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    mode = torchvision.io.ImageReadMode.RGB if channels == 3 else torchvision.io.ImageReadMode.GRAY
    try:
        image = torchvision.io.decode_image(torch.frombuffer(data, dtype=torch.uint8), mode, True)  # EXIF: turned
    except (RuntimeError, ValueError) as e:  # damaged, empty, or not an image
        raise UserError(f"cannot decode {path} as an image ({str(e).strip().splitlines()[0]})")
    image = image[0] if image.ndim == 4 else image  # (frames, C, H, W) of an animated GIF
    return image if image.dtype == torch.uint8 else (image.float() / 257).round().to(torch.uint8)  # 16 -> 8 bits


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
    recursively, linked folders too, each once), an .npz file of uint8 N x H x W x C `images` (and `labels`, which
    stratify the held-out split), or a torchvision dataset's training split under ROOT (downloaded when missing).
    Arrays are resized once, here; grey images repeated to three channels and alpha dropped, as decode_image does."""
    if os.path.isdir(spec):
        files, seen = [], {os.path.realpath(spec)}
        for d, folders, names in os.walk(spec, followlinks=True):
            folders[:] = [f for f in sorted(folders) if os.path.realpath(os.path.join(d, f)) not in seen]  # no loop
            seen.update(os.path.realpath(os.path.join(d, f)) for f in folders)
            files += [os.path.join(d, f) for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise UserError(f"--data {spec}: no images ({' '.join(IMAGE_EXTENSIONS)}) in this folder or below it")
        return ImageFiles(sorted(files), resolution), None
    if spec in TORCHVISION_DATASETS:
        cls, kwargs = TORCHVISION_DATASETS[spec]
        try:
            dataset = cls(root, download=True, **kwargs)
        except (RuntimeError, OSError) as e:  # not there, and no network
            raise UserError(f"could not get {spec} ({e}): put its files where torchvision.datasets.{cls.__name__}"
                            f"(root={root!r}) looks for them, or pass --data-root")
        if spec == "celeba":
            folder = os.path.join(root, dataset.base_folder, "img_align_celeba")
            return ImageFiles([os.path.join(folder, f) for f in dataset.filename], resolution), None
        images, labels = np.asarray(dataset.data), np.asarray(dataset.targets)  # N x H x W (x C)
    elif spec.endswith(".npz"):
        try:
            with np.load(spec) as f:
                images, labels = f["images"], f.get("labels")
        except (KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:  # no images; not an npz (a pickle?)
            raise UserError(f"--data {spec} is not a readable .npz file of 'images' ({type(e).__name__})")
    else:
        raise UserError(f"--data {spec}: not a folder, an .npz file, or one of {', '.join(TORCHVISION_DATASETS)}")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[3:] > (4,) or 0 in images.shape or \
            labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "biu"):
        raise UserError(f"{spec}: 'images' must be uint8 N x H x W x C (C = 1 to 4, none 0), and 'labels' one integer "
                        f"per image; not {images.dtype} {images.shape}" + ("" if labels is None else
                                                                          f", {labels.dtype} {labels.shape}"))
    images = torch.from_numpy(images.reshape(*images.shape[:3], -1)).permute(0, 3, 1, 2)
    return fit((images[:, :1].expand(-1, 3, -1, -1) if images.shape[1] <= 2 else images[:, :3]).contiguous(),
               resolution), None if labels is None else torch.as_tensor(labels.astype(np.int64))  # (any byte order)


def split(n, val_size, labels=None, seed=0):
    """(train indices, held-out indices): val_size items drawn with the seed, stratified when labels are given (each
    class its share, the largest remainders rounded up)."""
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
    state = load_pretrained(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url, "the perceptual loss "
                            "(--perceptual-weight 0 trains without it)")  # first: a missing file fails at once
    vgg = torchvision.models.vgg16(weights=None, init_weights=False)
    vgg.load_state_dict(state)
    return vgg.features


def load_lpips_weights(perceptual, path):
    """The LPIPS project's calibrated channel weights (v0.1 vgg.pth: lin0..lin4.model.1.weight, [1, C, 1, 1])."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for i, w in enumerate(perceptual.weights):
            w.data.copy_(state[f"lin{i}.model.1.weight"].reshape(w.shape))
    except (KeyError, RuntimeError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"--lpips-weights {path} is not LPIPS v0.1 vgg weights ({type(e).__name__})")


def inception_features(net, x):
    """rFID's features: x (B, 3, H, W) in [0, 1] -> (B, 2048) float64 from torchvision's Inception-v3, the images
    resized bilinearly to 299 x 299 and normalised with ImageNet's mean and std, as its weights expect."""
    x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
    return net(TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])).double()

# -----------------------------------------------------------------------------
# weights files: safetensors, a diffusers folder (its config.json), export

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def load_safetensors(path, metadata=False):
    """A .safetensors file -> {name: tensor} (and its "__metadata__" strings, with metadata=True). The format: an
    8-byte little-endian header length N, N bytes of JSON mapping each name to {"dtype", "shape", "data_offsets":
    [begin, end]} (and an optional "__metadata__"), then the tensors' bytes, offsets counted from the header's end.
    The header is checked before a tensor is built: JSON of that length, known dtypes, shapes of whole numbers, each
    tensor's bytes its shape times its item size, and the byte ranges tiling the data, each starting where one ends."""
    with open(path, "rb") as f:  # (read into one buffer: a 7 GB checkpoint is not held twice)
        blob = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(blob)
    start = 8 + int.from_bytes(blob[:8], "little")
    try:
        header = json.loads(blob[8:start]) if 8 <= start <= len(blob) else None
    except (ValueError, RecursionError):  # not JSON (nor UTF-8), or nested beyond reason
        header = None
    meta = header.pop("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path} is not a safetensors file: no JSON header of {start - 8} bytes (with string metadata)")
    entries = {}
    for name, info in header.items():
        dtype, shape, span = (info.get(k) if isinstance(info, dict) else None for k in ("dtype", "shape",
                                                                                         "data_offsets"))
        if not (dtype in SAFETENSORS_DTYPES and isinstance(shape, list) and all(type(d) is int and d >= 0
                                                                                for d in shape)
                and isinstance(span, list) and len(span) == 2 and all(type(o) is int for o in span)
                and span[1] - span[0] == math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize):
            raise UserError(f"{path} is not a valid safetensors file: tensor {name!r} is {json.dumps(info)[:80]}")
        entries[name] = SAFETENSORS_DTYPES[dtype], shape, span
    bounds = [0, *[o for _, _, span in sorted(entries.values(), key=lambda e: e[2]) for o in span], len(blob) - start]
    if bounds[::2] != bounds[1::2]:  # each range begins where the one before ends; the last ends with the file
        raise UserError(f"{path} is not a valid safetensors file: its tensors' byte ranges do not tile its "
                        f"{len(blob) - start} bytes of data (truncated, overlapping, or with gaps)")
    tensors = {name: torch.frombuffer(blob, dtype=dtype, count=math.prod(shape), offset=start + span[0]).reshape(shape)
               if span[1] > span[0] else torch.empty(shape, dtype=dtype)
               for name, (dtype, shape, span) in entries.items()}
    return (tensors, meta) if metadata else tensors


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
    write_atomically(path, struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def read_weights(path):
    """A .safetensors file, or a diffusers folder's diffusion_pytorch_model.safetensors -> {name: tensor}."""
    return load_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors") if os.path.isdir(path) else path)


def fit_weights(state, model, source):
    """`state` if it is a state dict of `model` (every key, each shape, finite values; the model may be on the meta
    device), else a one-line error."""
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    keys = [f"{len(names)} {kind}, e.g. {names[0]}" for kind, names in (("missing", missing),
                                                                         ("unexpected", unexpected)) if names]
    keys += [f"{k} is {list(t.shape)} there" for k, t in state.items() if t.shape != expected.get(k, t).shape]
    if keys:
        raise UserError(f"{source} does not fit this model ({'; '.join(keys[:2])}): pass the --preset or --config "
                        f"these weights were made for")
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in state.values()):
        raise UserError(f"{source} holds NaN or infinite values: these weights cannot reconstruct anything")
    return state


def diffusers_config(model):
    """The model's config.json as diffusers writes it: its class's name, each keyword (lists for tuples), the blocks."""
    n = len(model.config["block_out_channels"])
    return {"_class_name": type(model).__name__, **{k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in model.config.items()},
            **{key: list(model.config[key] or [plain] * n) for key, plain in BLOCK_TYPES.items()}}


def export(model, path):
    """The weights as PATH (.safetensors) with diffusers' config.json beside it: from_pretrained(that folder) loads
    them when PATH is its diffusion_pytorch_model.safetensors."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    save_safetensors(model.state_dict(), path, metadata={"format": "pt"})
    write_atomically(os.path.join(folder, "config.json"), json.dumps(diffusers_config(model), indent=2).encode())
    print(f"exported {path} and {os.path.join(folder, 'config.json')}")

# -----------------------------------------------------------------------------
# the model a command uses: a preset, a config.json, a diffusers folder, a checkpoint

PRESETS = {
    # Stable Diffusion 1.x / 2.x (CompVis kl-f8): 83,653,863 parameters; 4 latent channels, scaled by 0.18215.
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
               scaling_factor=0.18215),
    # small ones for CPUs and tests
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=1, latent_channels=4, sample_size=256),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=256),
}
BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}  # without attention


def build(config, source, model_class=None, device="cpu"):
    """model_class(**config) (default AutoencoderKL), or a one-line error that says why the config builds no model
    (device "meta": the modules and their config without the memory)."""
    try:
        with torch.device(device):
            return (model_class or AutoencoderKL)(**config)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:  # unknown fields, impossible values
        raise UserError(f"{source} describes no model this program builds ({type(e).__name__}: {e})")


def read_config(path, families={"AutoencoderKL": {}}):
    """A diffusers AutoencoderKL config.json (or the folder holding one) -> its keywords, without diffusers' own
    bookkeeping (the keys starting with "_"). families: the classes read, with the defaults a config of theirs is read
    over (sd_vae.py reads FLUX.2's too)."""
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(path, encoding="utf-8-sig") as f:  # (utf-8-sig: also a file saved with a byte-order mark)
            config = json.load(f)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is not a JSON config ({type(e).__name__})")
    if not isinstance(config, dict) or str(config.get("_class_name", "AutoencoderKL")) not in families:
        raise UserError(f"{path} is not a config.json of {' or '.join(families)}" + " (sd_vae.py reads other families')"
                        * (len(families) == 1))
    return {**families[config.get("_class_name", "AutoencoderKL")],
            **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if not k.startswith("_")}}


def architecture(args, presets=PRESETS, read=read_config):
    """The model's keywords: --config, or the config.json of a --weights folder (or beside its diffusion_pytorch_model
    file), or --preset (default sd). sd_vae.py passes its presets and its reader, for every family."""
    weights = args.weights or ""
    folder = weights if os.path.isdir(weights) else os.path.dirname(weights) if os.path.basename(weights).startswith(
        "diffusion_pytorch_model.") else None
    found = args.config or folder is not None and os.path.isfile(os.path.join(folder, "config.json")) and \
        os.path.join(folder, "config.json")
    if found and args.preset:
        raise UserError(f"--preset and {found} both describe the model: pass one of them")
    return read(found) if found else presets[args.preset or "sd"]


def pretrained(args):
    """(the autoencoder, in float32 on the CPU, and the checkpoint or None): a --ckpt's model (its EMA's weights with
    --ema), or the --weights, whose architecture comes from `architecture`."""
    if args.weights and args.ema:
        raise UserError("--ema takes the EMA weights of a --ckpt")
    if args.weights:
        model = build(architecture(args), args.config or args.weights)
        model.load_state_dict(fit_weights(read_weights(args.weights), model, args.weights))
        return model.eval(), None
    ckpt = load_checkpoint(args.ckpt)
    if args.ema and not ckpt.get("ema"):
        raise UserError(f"{args.ckpt} has no EMA weights (train with --ema DECAY)")
    model = build(ckpt["config"]["model"], f"{args.ckpt} (sd_vae.py reads the other families' checkpoints)")
    model.load_state_dict(ckpt["ema"] if args.ema else ckpt["model"])
    return model.eval(), ckpt

# -----------------------------------------------------------------------------
# the command line: train's options are Config's fields (and the data's); one check of the options


@dataclasses.dataclass
class TrainConfig(Config):
    """Config, and the data train reads (Part I's train() takes the data sets); the checkpoint keeps them all, so that
    eval finds its run's held-out images."""
    data: str = option(None, "a folder of images, an .npz file (uint8 N x H x W x C 'images'), or cifar10, mnist, "
                             "celeba", required=True)
    val_data: str = option(None, "held-out images (otherwise --val-size images of --data)")
    val_size: int = option(1000, "held-out images split off --data (stratified by label when it has labels)")
    data_root: str = option("./data", "where torchvision datasets are kept")
    resolution: int = option(256, "images are resized and centre-cropped to this square")


DATA_OPTIONS = ("data", "val_data", "val_size", "data_root", "resolution", "workers", "seed")  # of train and eval
PROGRAM, CHECKPOINT_KEYS = "kl_autoencoder.py", {"model", "config", "step"}  # what load_checkpoint expects


def parse_args(argv=None):
    p = Parser(description="Stable Diffusion's KL autoencoder: train, eval, reconstruct (for SD files: sd_vae.py).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_train_and_eval(sub)
    r = sub.add_parser("reconstruct", help="encode and decode one image")
    add_model_options(r)
    r.add_argument("--image", required=True)
    r.add_argument("--out", required=True, help="where to write the reconstruction (.png, or .jpg)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return settle(p.parse_args(argv))


def add_train_and_eval(sub, presets=PRESETS, files="a .safetensors file in diffusers' names"):
    """The train and eval commands and their options (sd_vae.py adds them to its own, with its presets and files)."""
    t, e = (sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter) for name, text in (
        ("train", "train an autoencoder (one process, or one per GPU with torchrun)"),
        ("eval", "evaluate a checkpoint or weights on held-out images")))
    add_model_options(t, train=True, presets=presets, files=files)
    add_config_options(t.add_argument_group("the run (Config: LDM's recipe, the loop; and the data)"), TrainConfig)
    t.set_defaults(steps=None)  # settle: 10,000 unless --epochs
    add_model_options(e, presets=presets, files=files)
    add_config_options(e.add_argument_group("data and run (default: the checkpoint's)"), TrainConfig,
                       names=(*DATA_OPTIONS, "precision", "device"), blank=True)
    e.add_argument("--out", help="where reconstructions.png and metrics.jsonl go (default: the checkpoint's folder)")
    for q in (t, e):
        q.add_argument("--export", metavar="FILE", help="the weights (at the end) as a .safetensors file, its "
                                                        "config.json beside it")
        q.add_argument("--fid", action="store_true", help="also rFID (needs torchvision's Inception-v3 weights)")
        q.add_argument("--overwrite", action="store_true", help="replace another run's files in OUT, and --export's")


def add_model_options(q, train=False, presets=PRESETS, files="a .safetensors file in diffusers' names",
                      ema="a --ckpt's"):
    """The model: --weights or --ckpt (train: --weights to fine-tune, and sizes), --preset or --config (sd_vae.py
    passes its presets and the files it reads)."""
    g = q.add_argument_group("the model")
    s = g if train else g.add_mutually_exclusive_group(required=True)
    s.add_argument("--weights", help=f"a diffusers folder (with its config.json), or {files}" + (": fine-tune them"
                                                                                                 if train else ""))
    if train:
        for name in ("--block-out-channels", "--layers-per-block", "--latent-channels"):
            g.add_argument(name, type=positive_int, nargs="+" if name == "--block-out-channels" else None,
                           help="overrides the preset")
        g.add_argument("--lpips-weights", help="the LPIPS project's v0.1 vgg.pth: calibrated channel weights")
    else:
        s.add_argument("--ckpt", help="a checkpoint written by train (its model's config is in it)")
        g.add_argument("--ema", action="store_true", help=f"the EMA weights: {ema}")
    g.add_argument("--preset", choices=sorted(presets), help="the architecture (default: a --weights folder's "
                                                             "config.json, else sd)")
    g.add_argument("--config", help="a diffusers config.json (or its folder)")


def add_config_options(g, fields, names=None, blank=False):
    """An option for each field of the dataclass `fields` (or those named), its default (with blank: None, and nothing
    required; eval settles them) and help; the kind of each field checked as argparse parses it."""
    kinds = {"lr": positive_float, "ema": decay, "betas": decay, "seed": seed, "disc_start": nonnegative_int,
             "eval_every": nonnegative_int, "workers": nonnegative_int, int: positive_int, float: nonnegative_float}
    for f in dataclasses.fields(fields):
        if names is None or f.name in names:
            keywords = {**f.metadata, "default": None if blank else f.default}
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


def settle(args, out_files={"reconstruct": (".png", ".jpg", ".jpeg")}):
    """The one place where options are checked against each other, and outputs against inputs: never written over one
    (however spelled, a folder's files too), nor over an existing file without --overwrite. out_files: the commands
    whose --out is a file, and its kinds."""
    inputs = [p for p in (getattr(args, k, None) for k in ("weights", "ckpt", "config", "image", "data")) if p]
    inputs += [os.path.join(p, name) for p in inputs if os.path.isdir(p) for name in os.listdir(p)]
    outputs = [("--out", args.out, out_files[args.command])] if args.command in out_files else []
    if getattr(args, "export", None) is not None:  # and the config.json beside it, in diffusers' format
        outputs += [("--export", args.export, (".safetensors",))] + [("--export's", os.path.join(os.path.dirname(
            args.export), "config.json"), (".json",))] * (getattr(args, "export_format", "diffusers") == "diffusers")
    for flag, path, extensions in outputs:
        same = any(os.path.abspath(path) == os.path.abspath(p) or os.path.exists(path) and os.path.samefile(path, p)
                   for p in inputs if os.path.exists(p))
        if same or not path.lower().endswith(extensions) or os.path.exists(path) and not args.overwrite:
            raise UserError(f"{flag} {path} " + ("is also an input of this command" if same else f"is not a "
                            f"{' or '.join(extensions)} file" if not path.lower().endswith(extensions) else
                            "exists: pass --overwrite to replace it, or another name"))
    if args.config and args.preset or getattr(args, "ckpt", None) and (args.config or args.preset):
        raise UserError("--preset, --config and --ckpt each describe the model: pass one of them")
    if args.command == "eval" and args.weights and not args.out:
        raise UserError("eval --weights: pass --out, the folder for metrics.jsonl and reconstructions.png")
    if args.command == "train":
        if args.steps is not None and args.epochs is not None:
            raise UserError("--steps and --epochs: pass one of them")
        args.steps, args.betas, args.device = args.steps or 10_000, tuple(args.betas), get_device(args.device).type
        args.precision = args.precision if args.precision != "auto" else "bf16" if args.device == "cuda" else "fp32"
    return args


def check_resolution(resolution, config, disc_weight=0):
    """A side length the model takes (and SSIM in every evaluation, and train's discriminator), or a one-line error."""
    f = 2 ** (len(config["block_out_channels"]) - 1)
    if resolution % f or resolution < 11 or disc_weight > 0 and resolution < 24:
        raise UserError(f"--resolution {resolution}: " + (
            f"not a multiple of {f}, this model's downsampling factor: use {max(f, resolution // f * f)} or "
            f"{-(-resolution // f) * f}" if resolution % f else "SSIM, in every evaluation, needs at least 11 x 11"
            if resolution < 11 else "the PatchGAN discriminator needs at least 24; use --disc-weight 0 below that"))

# -----------------------------------------------------------------------------
# train, eval, reconstruct, main


def model_source(args):
    """train's model: (its class, its keywords: the architecture with --block-out-channels, --layers-per-block and
    --latent-channels on top, the weights to start from or None)."""
    sizes = {k: tuple(v) if isinstance(v, list) else v for k in ("block_out_channels", "layers_per_block",
                                                                  "latent_channels") for v in [getattr(args, k)] if v}
    model = build({**architecture(args), **sizes}, args.config or args.weights or "the model", device="meta")
    return AutoencoderKL, model.config, fit_weights(read_weights(args.weights), model, args.weights) \
        if args.weights else None


def train_command(args, source=model_source):
    """train() with the options: a new run (another's files kept) or a resumed one (its model), the networks, the
    data; --export at the end. source(args) gives the model (sd_vae.py passes one that reads every family)."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    model_class, config, init = source(args)
    check_resolution(cfg.resolution, config, cfg.disc_weight)
    rank0, ckpt_path = os.environ.get("RANK", "0") == "0", os.path.join(cfg.out, "ckpt.pt")
    theirs = [n for n in ("ckpt.pt", "metrics.jsonl", "reconstructions.png") if os.path.exists(os.path.join(cfg.out,
                                                                                                           n))]
    if rank0 and theirs and not cfg.resume and not args.overwrite:
        raise UserError(f"{cfg.out} holds another run's {theirs[0]}: pass --resume to continue that run, another "
                        f"--out, or --overwrite")
    if rank0 and cfg.resume:
        saved = load_checkpoint(ckpt_path)
        if json.dumps(saved["config"]["model"]) != json.dumps(config):
            raise UserError(f"{ckpt_path} holds another model than these options describe: pass its options, or "
                            f"another --out")
        print(f"resuming {ckpt_path} at step {saved['step']}")
    if rank0:
        lock_folder(cfg.out)
    perceptual = Perceptual(load_vgg16()) if cfg.perceptual_weight > 0 else None  # fails early: a missing file
    if perceptual is not None and args.lpips_weights:
        load_lpips_weights(perceptual, args.lpips_weights)
    net = load_inception("cpu") if args.fid and rank0 else None
    cfg.workers = settled_workers(cfg)
    data, val = datasets(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(data) // world < cfg.batch_size:
        raise UserError(f"--batch-size {cfg.batch_size} is more than the {len(data) // world} training images of "
                        f"each of the {world} processes")
    if rank0:
        n = sum(p.numel() for p in build(config, "the model", model_class, "meta").parameters())
        backend = (" nccl" if cfg.device == "cuda" else " gloo") if "RANK" in os.environ else ""
        print(f"{model_class.__name__} {config['block_out_channels']}, {n:,} parameters; {len(data):,} training and "
              f"{len(val):,} held-out images at {cfg.resolution}x{cfg.resolution}; {world} process(es) on "
              f"{cfg.device}{backend}; " + (f"{cfg.epochs} epochs" if cfg.epochs else f"{cfg.steps:,} steps"))
    features = None if net is None else lambda x: inception_features(net.to(x.device), x)
    final, record = train(cfg, config, data, val, init=init, perceptual=perceptual, features=features,
                          model_class=model_class)
    if final is not None and args.export:
        export(final, args.export)
    return record


def settled_workers(args):
    """--workers, or its default: up to 4 (one per core) to decode image files, none for arrays in memory."""
    if args.workers is not None:
        return args.workers
    return min(4, os.cpu_count() or 1) if os.path.isdir(args.data) or args.data == "celeba" else 0


def eval_command(args, load=pretrained):
    """evaluate() a checkpoint or a weights file on held-out images: its training run's split (or a default run's)
    unless the options say otherwise; --fid, --export. load(args) gives the model (sd_vae.py: every family's)."""
    model, ckpt = load(args)
    saved = ckpt["config"] if ckpt else vars(TrainConfig(data=args.data))  # the held-out split of a default train run
    for key in DATA_OPTIONS:
        setattr(args, key, saved.get(key) if getattr(args, key) is None else getattr(args, key))
    if args.data is None:
        raise UserError(f"{args.ckpt or args.weights} does not say what data to evaluate on: pass --data")
    check_resolution(args.resolution, model.config)
    device, args.workers = get_device(args.device or "auto"), settled_workers(args)
    args.precision = args.precision if args.precision not in (None, "auto") else "bf16" if device.type == "cuda" \
        else "fp32"
    out = args.out or os.path.dirname(os.path.abspath(args.ckpt))
    ours = args.ckpt and os.path.abspath(args.ckpt) == os.path.abspath(os.path.join(out, "ckpt.pt"))
    theirs = [n for n in ("metrics.jsonl", "reconstructions.png") if os.path.exists(os.path.join(out, n))]
    if theirs and not ours and not args.overwrite:  # another run's (or a checkpoint copied into another run's folder)
        raise UserError(f"{out} holds another run's {theirs[0]}: pass another --out, or --overwrite")
    lock_folder(out)
    net = load_inception(device) if args.fid else None
    record = evaluate_and_log(model.to(device), datasets(args)[1], args, step=ckpt["step"] if ckpt else 0, out=out,
                              features=None if net is None else lambda x: inception_features(net, x))
    if args.export:
        export(model, args.export)
    return record


@torch.no_grad()
def reconstruct(args):
    """--image, encoded and decoded (the posterior mean) -> --out; prints the latent's shape and the PSNR."""
    model, _ = pretrained(args)
    device, f = get_device(args.device), model.downsampling_factor
    x = decode_image(args.image, model.config["in_channels"])[None].float() / 127.5 - 1
    if x.shape[2] % f or x.shape[3] % f:
        raise UserError(f"{args.image} is {x.shape[2]}x{x.shape[3]} (height x width); this model needs sides that are "
                        f"multiples of {f}: crop or pad it")
    posterior = model.to(device).encode(x.to(device))
    out = model.decode(posterior.mode())
    write_image(out[0], args.out)
    quality = psnr(to_uint8(out).float().cpu() / 255, to_uint8(x).float() / 255).item()
    print(f"latent {list(posterior.mean.shape)} (B, C, H/{f}, W/{f}) | PSNR {quality:.2f} dB | wrote {args.out}")
    return quality


def main(argv=None, parse=parse_args, commands=None, program="kl_autoencoder.py"):
    """The command, and the one place where what a user can cause becomes one line and exit 2 (interrupted: 130).
    sd_vae.py runs its own commands through it."""
    try:
        args = parse(argv)
        return (commands or {"train": train_command, "eval": eval_command, "reconstruct": reconstruct})[args.command](
            args)
    except (UserError, OSError, FloatingPointError) as e:  # what a user can cause: a mistake, a file, a diverged run
        traceback.clear_frames(e.__traceback__)  # end its DataLoader workers now (collected later, they take 5 s)
        message = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e).strip()
        if "Original Traceback" in message:  # raised in a DataLoader worker: its traceback's last line
            message = message.splitlines()[-1].split("Error: ", 1)[-1]
        print(f"{program}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; the last checkpoint is kept, no file is left half-written", file=sys.stderr)
        sys.exit(130)
    finally:
        while LOCKS:  # (main may be called from Python: the run's folder is let go)
            os.close(LOCKS.pop())


# =============================================================================
# Shared with vae.py: each file stands alone, so these are written in both; a test keeps them identical.
# =============================================================================


class UserError(Exception):
    """A mistake in how the program was called: main() prints it as one line and exits with 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we want one line, like our own errors
        raise UserError(f"{message} (see --help)")


def _number(kind, low, inclusive, high=math.inf):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (low <= value if inclusive else low < value) or not value <= high or not math.isfinite(value):
            limits = f"{'>=' if inclusive else '>'} {low}" + (f" and at most {high}" if high < math.inf else "")
            raise argparse.ArgumentTypeError(f"must be {limits}, got {text}")
        return value
    return parse


positive_int, nonnegative_int = _number(int, 0, False), _number(int, 0, True)
positive_float, nonnegative_float = _number(float, 0, False), _number(float, 0, True)
seed = _number(int, 0, True, 2 ** 63 - 1)


def get_device(name):
    """--device: auto is cuda, else mps, else the CPU; a device that is not there is a one-line error."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in available if available[d]) if name == "auto" else name
    if not available[name]:
        raise UserError(f"--device {name}: PyTorch sees no such device here; use --device cpu or auto")
    return torch.device(name)


def load_checkpoint(path):
    """A checkpoint of this program, read with weights_only=True (tensors and plain containers: no code in it runs)."""
    try:  # (a missing file: an OSError, which main says in one line)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as e:  # what torch.load raises for other files
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}): pass a ckpt.pt of {PROGRAM}")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise UserError(f"{path} is not a {PROGRAM} checkpoint (it lacks one of {', '.join(sorted(CHECKPOINT_KEYS))})")
    return ckpt


def load_pretrained(url, needed_by):
    """torchvision's weights at url as a state dict, through torch.hub: downloaded into $TORCH_HOME/hub/checkpoints on
    first use (its sha256 checked against the digits in its name) or put there by hand, and unpickled with
    weights_only=True: a file that holds code is refused, never run."""
    try:
        with contextlib.redirect_stderr(sys.stdout):  # (torch 2.6 says "Downloading ..." on stderr, later ones stdout)
            return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                                      weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:  # no network (URLError is an OSError), a bad file
        raise UserError(f"{needed_by} needs torchvision's {os.path.basename(url)} and could not get it "
                        f"({type(e).__name__}): put that file into {os.path.join(torch.hub.get_dir(), 'checkpoints')}")


def load_inception(device):
    """torchvision's ImageNet Inception-v3 without its classifier: images -> 2048-d pool features."""
    state = load_pretrained(torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.url, "--fid")
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    net.load_state_dict(state)
    net.fc = nn.Identity()
    return net.eval().to(device)


LOCKS = []  # the descriptors by which this process holds its folders' locks


def lock_folder(folder):
    """Make `folder` if need be and lock it: a second run into it, while this one works, is refused. The system lets
    the lock go when the process ends (kill -9 too); where it has no locks, the run goes on without."""
    os.makedirs(folder, exist_ok=True)
    if fcntl is not None:
        LOCKS.append(os.open(folder, os.O_RDONLY))
        try:
            fcntl.flock(LOCKS[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:  # BlockingIOError: held; others (Lustre, some NFS mounts): no locks there
            os.close(LOCKS.pop())
            if isinstance(e, BlockingIOError):
                raise UserError(f"{folder} is in use by another run right now: wait for it to end, or write elsewhere")


if __name__ == "__main__":
    main()
