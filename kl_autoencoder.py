"""
The KL autoencoder of Stable Diffusion (Rombach et al. 2022, "kl-f8"), in one file, to be read top
to bottom. The architecture is that of diffusers' AutoencoderKL, and the weights are interchangeable:
a diffusers state dict loads here with strict=True, key for key.

    python kl_autoencoder.py reconstruct --weights vae.safetensors --preset sd --image in.png --out out.png

An image x (values in [-1, 1]) is encoded to a diagonal Gaussian posterior q(z|x) over a latent
with `latent_channels` channels and 1/f of the image's height and width (f = 2^(levels - 1), 8 for
SD); decoding z (the posterior mean, or a sample) gives the reconstruction. Diffusion models work on
z * scaling_factor, a number chosen so that the scaled latents have unit standard deviation.

Sections: config, images, model, weights (safetensors), the math, commands, entry point.
"""

import argparse
import inspect
import json
import math
import os
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

# -----------------------------------------------------------------------------
# config

PRESETS = {
    # Stable Diffusion 1.x / 2.x: kl-f8, 83,653,863 parameters.
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, scaling_factor=0.18215),
    # SDXL: the same shapes, another scaling factor.
    "sdxl": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, scaling_factor=0.13025),
    # small ones for CPUs and tests
    "small": dict(block_out_channels=(64, 128, 128), layers_per_block=1, latent_channels=4),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4),
}


class UserError(Exception):
    """A mistake in how the program was called: main() prints it as one line and exits with 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error of ours
        raise UserError(f"{message} (see --help)")


def get_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device here (torch.cuda.is_available() is False); use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this PyTorch has no MPS (Apple GPU) backend here; use --device cpu or auto")
    return torch.device(name)

# -----------------------------------------------------------------------------
# images


def read_image(path, channels=3):
    """An image file -> float tensor (1, C, H, W) in [-1, 1], the autoencoder's input range."""
    if not os.path.isfile(path):
        raise UserError(f"no image at {path}")
    mode = torchvision.io.ImageReadMode.RGB if channels == 3 else torchvision.io.ImageReadMode.GRAY
    try:
        image = torchvision.io.read_image(path, mode=mode)
    except RuntimeError as e:
        raise UserError(f"cannot decode {path} as an image ({str(e).strip().splitlines()[0]})")
    return image[None].float() / 127.5 - 1


def to_uint8(x):
    """[-1, 1] -> uint8 [0, 255], rounded: what an image file holds."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def write_image(x, path):
    """(C, H, W) in [-1, 1] -> PNG, or JPEG (quality 95) when the name ends in .jpg or .jpeg."""
    image = to_uint8(x).cpu()
    if path.lower().endswith((".jpg", ".jpeg")):
        torchvision.io.write_jpeg(image, path, quality=95)
    else:
        torchvision.io.write_png(image, path)

# -----------------------------------------------------------------------------
# model: the modules, in the order an image meets them, named as diffusers names them


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), with a 1x1 conv_shortcut on x when the
    number of channels changes (diffusers' ResnetBlock2D without time embedding)."""

    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
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

    def __init__(self, in_channels, out_channels, n_blocks, groups, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(n_blocks)])
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
    """Residual block, attention, residual block, at the lowest resolution. The attention is
    registered first, as in diffusers' UNetMidBlock2D, so the state dict lists it first."""

    def __init__(self, channels, groups):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    """x (B, in, H, W) -> (B, 2 * latent, H/f, W/f): conv_in, levels of `layers_per_block` residual
    blocks with a downsampler on all but the last, mid block, GroupNorm, SiLU, conv_out."""

    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        channels = [block_out_channels[0], *block_out_channels]
        last = len(block_out_channels) - 1
        self.down_blocks = nn.ModuleList([Level(channels[i], channels[i + 1], layers_per_block, groups, None if i == last else "down")
                                          for i in range(len(block_out_channels))])
        self.mid_block = MidBlock(block_out_channels[-1], groups)
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

    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        last = len(rev) - 1  # up_blocks before mid_block: diffusers' state dict lists them first
        self.up_blocks = nn.ModuleList([Level(rev[max(i - 1, 0)], rev[i], layers_per_block + 1, groups, None if i == last else "up")
                                        for i in range(len(rev))])
        self.mid_block = MidBlock(rev[0], groups)
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
        and with other = None the prior N(0, I): 1/2 sum (mean^2 + var - 1 - logvar)."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
                               dim=[1, 2, 3])

    def nll(self, x, dims=(1, 2, 3)):
        """-log N(x; mean, diag var) = 1/2 sum (log 2 pi + logvar + (x - mean)^2 / var)."""
        return 0.5 * torch.sum(math.log(2 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var, dim=list(dims))


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> q(z|x);  z -> post_quant_conv -> Decoder. Keyword names as in
    diffusers' config. scaling_factor is stored, not applied: diffusion works on z * scaling_factor."""

    def __init__(self, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 latent_channels=4, norm_num_groups=32, scaling_factor=0.18215, use_quant_conv=True, use_post_quant_conv=True):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels, block_out_channels=tuple(block_out_channels),
                           layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
                           scaling_factor=scaling_factor, use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv)
        self.scaling_factor = scaling_factor
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups)
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

    @classmethod
    def from_config(cls, config):
        """From a diffusers config.json dict: checks the keys this architecture fixes, keeps the rest."""
        fixed = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}
        for key, block in fixed.items():
            if key in config and any(t != block for t in config[key]):
                raise UserError(f"{key} {config[key]} is not supported: only {block}")
        if config.get("act_fn", "silu") != "silu" or not config.get("mid_block_add_attention", True):
            raise UserError("only act_fn 'silu' with mid-block attention is supported")
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in config.items() if k in names})


def build(preset, **overrides):
    """The AutoencoderKL of a named preset, with keyword overrides."""
    return AutoencoderKL(**{**PRESETS[preset], **overrides})

# -----------------------------------------------------------------------------
# weights: a safetensors reader, and the names older files use

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
MAX_HEADER = 100_000_000  # bytes; the safetensors format caps its JSON header at this size


class SafetensorsError(UserError):
    """A file that is not valid safetensors: raised before any tensor data is read."""


def load_safetensors(path):
    """Read a .safetensors file into {name: tensor} (on the CPU, in the file's dtypes).

    The format: an 8-byte little-endian unsigned header length N, N bytes of JSON mapping each
    name to {"dtype", "shape", "data_offsets": [begin, end]} (plus an optional "__metadata__"),
    then the raw little-endian bytes of the tensors, offsets counted from the end of the header.
    Everything is checked before a tensor is built: the header's size, its JSON, each dtype, each
    shape, that each byte range has the size shape x item size, and that the ranges tile the data
    exactly, in order, with no gap or overlap and nothing past the end of the file.
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
            raise SafetensorsError(f"{path} is not safetensors or is truncated: header length {n} with {size - 8} bytes after it")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: the header is not valid JSON ({e})")
        if not isinstance(header, dict):
            raise SafetensorsError(f"{path}: the header is not a JSON object")
        header.pop("__metadata__", None)
        data_len = size - 8 - n
        entries = []
        for name, info in header.items():
            where = f"{path}: tensor {name!r}"
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
                raise SafetensorsError(f"{where} lacks dtype, shape or data_offsets")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in SAFETENSORS_DTYPES:
                raise SafetensorsError(f"{where} has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
            if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise SafetensorsError(f"{where} has an invalid shape {shape!r}")
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
                raise SafetensorsError(f"{where} has invalid data_offsets {offsets!r}")
            nbytes = math.prod(shape) * torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
            if offsets[1] - offsets[0] != nbytes:
                raise SafetensorsError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {nbytes}")
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
        data = bytearray(f.read(data_len))
    tensors = {}
    for begin, stop, name, dtype, shape in entries:
        torch_dtype = SAFETENSORS_DTYPES[dtype]
        if stop == begin:
            tensors[name] = torch.empty(shape, dtype=torch_dtype)
        else:
            tensors[name] = torch.frombuffer(data, dtype=torch_dtype, count=math.prod(shape), offset=begin).reshape(shape)
    return tensors


def save_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} in the layout load_safetensors() reads (names sorted, the header
    padded with spaces to a multiple of 8 bytes, as the safetensors package does); atomically."""
    dtype_names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": dtype_names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for data in chunks:
            f.write(data)
    os.replace(path + ".tmp", path)


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate names {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    return dict(pairs)


LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def convert_state_dict(state):
    """A state dict in diffusers' current names, from one that may use the older attention names
    (query, key, value, proj_attn) and their [C, C, 1, 1] convolution-shaped weights."""
    converted = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in LEGACY_ATTENTION:
            name = ".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])
        if ".attentions." in name and name.endswith(".weight") and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
            tensor = tensor[:, :, 0, 0]
        converted[name] = tensor
    return converted


def load_weights(model, state, source="the state dict", preset=None):
    """Load a diffusers-format state dict (old attention names accepted) with strict key and shape
    checks, raising one-line errors that name what does not fit."""
    state = convert_state_dict(state)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    fit = f" (preset {preset})" if preset else ""
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise UserError(f"{source} does not fit this model{fit}: keys {'; '.join(parts)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{source} does not fit this model{fit}: {name} is {list(tensor.shape)} there and {list(expected[name].shape)} here")
    model.load_state_dict(state, strict=True)
    return model

# -----------------------------------------------------------------------------
# the math


def psnr(x, y):
    """Peak signal-to-noise ratio in dB per image, for values in [0, 1]: 10 log10(1 / MSE),
    the MSE taken over channels, height and width. x, y: (B, C, H, W) -> (B,); inf when equal."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse)

# -----------------------------------------------------------------------------
# commands


@torch.no_grad()
def reconstruct(args):
    device = get_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build(args.preset)
    f = model.downsampling_factor
    x = read_image(args.image, model.config["in_channels"])
    h, w = x.shape[2:]
    if h % f or w % f:
        lo, hi = (f"{(h // f) * f}x{(w // f) * f}", f"{-(-h // f) * f}x{-(-w // f) * f}")
        raise UserError(f"{args.image} is {h}x{w} (height x width); preset {args.preset} needs sides that are multiples of {f}, "
                        f"e.g. {lo} or {hi}: crop or pad it")
    load_weights(model, load_safetensors(args.weights), args.weights, args.preset)
    model = model.to(device=device, dtype=dtype).eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    posterior = model.encode(x.to(device=device, dtype=dtype))
    out = model.decode(posterior.mode())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    write_image(out[0], args.out)
    quality = psnr((to_uint8(out).float() / 255).cpu(), to_uint8(x).float() / 255).item()
    print(f"latent {list(posterior.mean.shape)} (B, C, H/{f}, W/{f}) | PSNR {quality:.2f} dB | {seconds:.3f} s on {device} "
          f"({args.dtype}) | wrote {args.out}")
    return quality


def parse_args(argv=None):
    p = Parser(description="The Stable Diffusion KL autoencoder: reconstruct (and, later, train and evaluate).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    r = sub.add_parser("reconstruct", help="encode and decode one image with given weights",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--weights", required=True, help="a diffusers-format .safetensors file (e.g. diffusion_pytorch_model.safetensors)")
    r.add_argument("--preset", default="sd", choices=sorted(PRESETS), help="the architecture the weights are for")
    r.add_argument("--image", required=True)
    r.add_argument("--out", required=True, help="where to write the reconstruction (.png, or .jpg)")
    r.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    r.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 is for GPUs (fp16 overflows in the SDXL VAE)")
    return p.parse_args(argv)


def main(argv=None):
    try:
        args = parse_args(argv)
        return {"reconstruct": reconstruct}[args.command](args)
    except UserError as e:
        print(f"kl_autoencoder.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
