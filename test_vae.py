"""The programs' specification: vae.py, then kl_autoencoder.py, each in the order of its source (the objectives
first: the gradients each training step hands its optimizer, derived here from the formulas alone), then what both
promise: every user mistake is one line and exit 2 with nothing written (one table), signals, the helpers they share.

Nothing here touches the network: the tests write their own small data. The formulas' proofs are in test_math.py.
"""

import ast
import builtins
import copy
import errno
import dataclasses
import gzip
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import types
import urllib.error

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn as nn
import torchvision

import kl_autoencoder as kl
import vae

# torchvision.io reads 16-bit PNGs from 0.20 (0.20.1 does, tried with torch 2.5.1; its docs say 0.21)
DECODES_16_BITS = tuple(map(int, torchvision.__version__.split(".")[:2])) >= (0, 20)

# ============================================================================= helpers and fixtures

HERE = os.path.dirname(os.path.abspath(__file__))


TINY = ["--device", "cpu", "--hidden", "64", "--latent-dim", "4", "--batch-size", "32", "--lr", "3e-3", "--eval-samples", "16"]


def write_idx(path, array):
    """IDX format: zero bytes, type 0x08 (uint8), number of dimensions, big-endian int32 sizes, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def fake_digits(n, seed):
    """n 28x28 uint8 images: one of four strokes (bar, column, box, diagonal) at a random offset,
    so there is structure to learn, with grey edges so the intensities are not all 0 or 255."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    for img, kind, dy, dx in zip(images, rng.integers(0, 4, n), rng.integers(-3, 4, n), rng.integers(-3, 4, n)):
        if kind == 0:
            img[12 + dy:16 + dy, 6:22] = 255
        elif kind == 1:
            img[6:22, 12 + dx:16 + dx] = 255
        elif kind == 2:
            img[8 + dy:20 + dy, 8 + dx:20 + dx] = 255
            img[11 + dy:17 + dy, 11 + dx:17 + dx] = 0
        else:
            for i in range(6, 22):
                img[i, i + dx - 1:i + dx + 2] = 255
        img[img == 0] = np.where(rng.random((img == 0).sum()) < 0.02, 128, 0)
    return images


def make_mnist(root, n_train=256, n_test=64, gz=False):
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    ext = ".gz" if gz else ""
    train, test = fake_digits(n_train, 0), fake_digits(n_test, 1)
    write_idx(os.path.join(raw, "train-images-idx3-ubyte" + ext), train)
    write_idx(os.path.join(raw, "train-labels-idx1-ubyte" + ext), np.arange(n_train) % 10)
    write_idx(os.path.join(raw, "t10k-images-idx3-ubyte" + ext), test)
    write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte" + ext), np.arange(n_test) % 10)
    return train, test


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_main(args):
    """vae.main in this process; returns the exit code (0 when it returned normally)."""
    try:
        vae.main(args)
    except SystemExit as e:
        return e.code
    return 0


def one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vae.py: error: "), err
    for word in words:
        assert word in err, err
    return err


def kl_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kl_autoencoder.py: error: "), err
    for word in words:
        assert word in err, err


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Recorder(torch.optim.Optimizer):
    """An optimizer that leaves the weights alone and keeps the gradients its step() was given."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [None if p.grad is None else p.grad.clone() for g in self.param_groups for p in g["params"]]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def spy_optimizer(base):
    """A subclass of a torch optimizer that notes, at every step, its hyperparameters, the norm of the gradients it is
    handed and the weights before the step (patched in for torch.optim.<name>, it sees what the program passes)."""
    class Spy(base):
        steps = []

        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
            Spy.steps.append({**{k: v for k, v in self.param_groups[0].items() if k != "params"},
                              "grad_norm": torch.cat(grads).norm().item(), "weights": [p.detach().clone() for p in params]})
            return super().step(closure)
    return Spy


def grid_tile(grid, row, col, size, padding=2):
    """The image at (row, col) of a picture drawn by torchvision's make_grid (C, H, W), padding 2."""
    y, x = padding + row * (size + padding), padding + col * (size + padding)
    return grid[:, y:y + size, x:x + size]


def smooth_images(n, size, seed=0):
    """uint8 (n, size, size, 3): random 4 x 4 colour grids blown up bilinearly, easy to autoencode."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return (big * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_test_image(path, h, w):
    torch.manual_seed(0)
    torchvision.io.write_png(torch.randint(0, 256, (3, h, w), dtype=torch.uint8), str(path))


def write_json(path, obj):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def stand_in_features(d_in, d_out=8):
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, d_out)).double()


def independent_frechet(real, fake):
    """FID from two feature matrices (N, D), written out with numpy: the trace of the matrix square root as the
    sum of the square roots of the eigenvalues of S1 S2."""
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


class RecordingFeatures(nn.Module):
    """A stand-in for Inception-v3 that keeps what reaches it and returns a few of its pixels as features."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return x[:, :, ::60, ::60].flatten(1).double()


_RANDOM_VGG = []  # built once, then copied


def vgg16_features():
    """torchvision's vgg16().features, built alone (the whole VGG16 takes 2.6 s here, its classifier nearly all)."""
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])


def random_vgg_features():
    """VGG16's convolutional layers with torch.manual_seed(0)'s random weights; the global random state left as
    building them leaves it."""
    if not _RANDOM_VGG:
        torch.manual_seed(0)
        _RANDOM_VGG.extend([vgg16_features(), torch.get_rng_state()])
    torch.set_rng_state(_RANDOM_VGG[1])
    return copy.deepcopy(_RANDOM_VGG[0])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mnist"))
    make_mnist(root)
    return root


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One short training run shared by the tests that only read its outputs."""
    out = str(tmp_path_factory.mktemp("run"))
    record = vae.main(["--data-dir", data_dir, "--out", out, "--epochs", "6", *TINY])
    return out, record


@pytest.fixture(scope="module")
def kl_data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kldata") / "images.npz")
    np.savez(path, images=smooth_images(96, 32), labels=np.arange(96) % 4)
    return path


KL_TINY = ["--preset", "tiny", "--resolution", "32", "--batch-size", "8", "--val-size", "16", "--device", "cpu",
           "--perceptual-weight", "0", "--lr", "1e-3", "--log-every", "4", "--eval-every", "0"]


def kl_records(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weights") / "tiny.safetensors")
    kl.save_safetensors(kl.build("tiny").state_dict(), path)
    return path


# ============================================================================= vae.py

# ----------------------------------------------------------------------------- the objectives: the gradient of one training step

def stated_vae_objective(model, x_train, cfg, epoch, seed):
    """The objective vae.py's docstrings state, for a training set of one batch, written out from the formulas:
    the same random draws as train_epoch (permutation, binarization or dequantization, then the posterior samples)."""
    torch.manual_seed(seed)
    x = x_train[torch.randperm(len(x_train))]
    x = torch.bernoulli(x) if cfg.likelihood == "bernoulli" else (x * 255 + torch.rand(x.shape)) / 256
    mu, logvar = model.encoder(x).chunk(2, dim=-1)

    def log_px_z(z):  # the decoder's output plus its per-pixel bias
        out = model.decoder(z.reshape(-1, z.shape[-1])).reshape(*z.shape[:-1], 784) + model.out_bias
        if cfg.likelihood == "bernoulli":
            return (x * torch.log(torch.sigmoid(out)) + (1 - x) * torch.log(1 - torch.sigmoid(out))).sum(-1)
        s = model.dec_logvar
        return (-0.5 * (math.log(2 * math.pi) + s + (x - out) ** 2 / s.exp())).sum(-1)

    def log_normal(z, m, lv):
        return (-0.5 * (math.log(2 * math.pi) + lv + (z - m) ** 2 / lv.exp())).sum(-1)
    k = cfg.train_samples
    z = mu + torch.exp(0.5 * logvar) * torch.randn(k, *mu.shape).squeeze(0)
    if k > 1:  # -L_K, the importance-weighted bound
        log_w = log_px_z(z) + log_normal(z, torch.zeros(()), torch.zeros(())) - log_normal(z, mu, logvar)
        return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)
    if cfg.capacity is not None:  # C at the global step: epoch * steps per epoch (+ 0, the first step)
        c = cfg.capacity * min(1.0, epoch * (len(x_train) // cfg.batch_size) / cfg.capacity_iters)
        return (-log_px_z(z) + cfg.gamma * (kl - c).abs()).mean()
    return (-log_px_z(z) + cfg.beta * kl).mean()


@pytest.mark.parametrize("flags", [[], ["--beta", "4"], ["--capacity", "50", "--capacity-iters", "10", "--gamma", "3"],
                                   ["--train-samples", "5"], ["--likelihood", "gaussian"], ["--arch", "conv"]],
                         ids=["elbo", "beta", "capacity", "iwae", "gaussian", "conv"])
def test_vae_train_step_applies_the_gradient_of_the_stated_objective(flags):
    """One real training step (train_epoch on a training set of one batch, in epoch 5) hands the optimizer the
    gradient of the objective its option names, with the decoder's output bias in it and C at the global step."""
    cfg = vae.parse_args(["--hidden", "16", "--latent-dim", "3", "--batch-size", "32", *flags])
    torch.manual_seed(0)
    model = vae.VAE(cfg.arch, cfg.hidden, cfg.latent_dim, cfg.activation, cfg.likelihood)
    with torch.no_grad():
        model.out_bias.normal_()  # a bias that is not zero, so that dropping it shows
        if cfg.likelihood == "gaussian":
            model.dec_logvar.fill_(-1.0)
    x_train = torch.rand(32, 784)
    opt = Recorder(model.parameters())
    torch.manual_seed(5)
    loss, _, _ = vae.train_epoch(model, opt, x_train, cfg, epoch=5)
    expected = stated_vae_objective(model, x_train, cfg, 5, seed=5)
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    grads = torch.autograd.grad(expected, list(model.parameters()))
    assert relative_error(flat(opt.grads), flat(grads)) < 1e-4  # float32, the two sums taken in different orders


# ----------------------------------------------------------------------------- model and training

def test_output_bias_starts_at_the_mean_image():
    x = torch.rand(100, 784) * 0.5
    model = vae.VAE(hidden=[8], latent_dim=2)
    vae.init_output_bias(model, x)
    assert torch.allclose(torch.sigmoid(model.out_bias), x.mean(0).clamp(1e-3, 1 - 1e-3), atol=1e-6)


def test_a_new_run_starts_the_decoder_at_the_mean_image(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(vae, "train_epoch", lambda *args, **kwargs: [0.0, 0.0, 0.0])  # no training: the saved model is the initial one
    vae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "1", *TINY])
    bias = torch.load(str(tmp_path / "ckpt.pt"), weights_only=True)["model"]["out_bias"]
    x_train, _ = vae.load_mnist(data_dir, torch.device("cpu"))
    assert torch.allclose(bias, torch.logit(x_train.mean(0).clamp(1e-3, 1 - 1e-3)))


def test_test_set_binarization_is_fixed_and_training_batches_are_fresh():
    x = torch.full((200, 784), 0.5)
    a, b = vae.prepare_test_set(x, "bernoulli"), vae.prepare_test_set(x, "bernoulli")
    assert torch.equal(a, b) and set(a.unique().tolist()) == {0.0, 1.0}
    torch.manual_seed(0)
    assert not torch.equal(vae.prepare(x, "bernoulli"), vae.prepare(x, "bernoulli"))
    # dequantization keeps each grey level inside its own bin [k/256, (k+1)/256)
    levels = torch.arange(256.0).repeat(4) / 255
    d = vae.prepare(levels, "gaussian")
    assert torch.equal((d * 256).floor(), levels * 255)


def test_training_lowers_the_loss(trained):
    out, _ = trained
    epochs = [r for r in read_metrics(out) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6]
    # On 64 test images the one-sample -ELBO has a standard error of about 1 nat at this scale;
    # six epochs on these strokes take tens of nats off it.
    assert epochs[-1]["test_nelbo"] < epochs[0]["test_nelbo"] - 10
    assert epochs[-1]["train_bound"] < epochs[0]["train_bound"] - 10


@pytest.mark.parametrize("flags", [
    ["--arch", "conv"],
    ["--likelihood", "gaussian"],
    ["--train-samples", "5"],
    ["--beta", "4"],
    ["--capacity", "5", "--capacity-iters", "10", "--gamma", "10"],
    ["--activation", "tanh", "--lr-schedule", "iwae"],
])
def test_every_variant_trains(data_dir, tmp_path, flags):
    """Each variant runs end to end and logs the loss of its own objective (the gradient of each is checked
    step by step in test_vae_train_step_applies_the_gradient_of_the_stated_objective): beta * KL in place of KL,
    a capacity term that is never negative, and for the others the loss is the bound itself."""
    record = vae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "2", *TINY, *flags])
    epochs = [r for r in read_metrics(str(tmp_path)) if r["kind"] == "epoch"]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_nelbo"]) for r in epochs)
    for r in epochs:  # train_bound = -ELBO (or -L_K) = mean(-log p(x|z) + KL), per example
        if "--beta" in flags:
            assert r["train_loss"] == pytest.approx(r["train_bound"] + 3 * r["train_kl"], rel=1e-4)
        elif "--capacity" in flags:
            assert r["train_loss"] >= r["train_bound"] - r["train_kl"] - 1e-3 and r["train_loss"] != r["train_bound"]
        else:
            assert r["train_loss"] == pytest.approx(r["train_bound"], rel=1e-6)
    # -L_16 below the one-sample -ELBO: after two epochs the gap is several nats, the noise of each
    # estimate on 64 test images a fraction of one
    assert math.isfinite(record["test_nll"]) and record["test_nll"] < record["test_nelbo"]


def test_adam_on_the_batch_mean_with_eps_over_b_steps_as_adam_on_the_sum_with_eps():
    """Why the IWAE preset's eps is 1e-4 / 20: Burda et al.'s Adam (eps 1e-4) steps on the gradient of the batch
    sum; ours on that of the mean, B = 20 times smaller. Adam's step m / (sqrt(v) + eps) is unchanged when the
    gradient and eps are scaled alike, so the two runs take the same steps (float64; to rounding)."""
    torch.manual_seed(0)
    start, data = torch.randn(5, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64) * 1e-3  # small: eps counts
    paths = []
    for reduce, eps in ((torch.sum, 1e-4), (torch.mean, 1e-4 / 20)):
        w = start.clone().requires_grad_()
        opt = torch.optim.Adam([w], lr=1e-3, eps=eps)
        for _ in range(5):
            opt.zero_grad()
            reduce(((data - w) ** 2).sum(1) * 1e-3).backward()
            opt.step()
        paths.append(w.detach())
    assert torch.allclose(paths[0], paths[1], rtol=0, atol=1e-12) and not torch.allclose(paths[0], start, atol=1e-6)
    assert vae.parse_args(["--preset", "iwae"]).adam_eps == 1e-4 / 20


def test_preset_iwae_and_its_schedule():
    cfg = vae.parse_args(["--preset", "iwae"])
    assert (cfg.hidden, cfg.latent_dim, cfg.activation, cfg.batch_size, cfg.epochs, cfg.adam_eps, cfg.eval_samples) \
        == ([200, 200], 50, "tanh", 20, 3280, 1e-4 / 20, 5000)  # and Burda et al.'s K = 5000 for the test NLL
    assert vae.parse_args(["--preset", "iwae", "--epochs", "3"]).epochs == 3  # explicit flags win
    lrs = [vae.lr_at(e, cfg) for e in range(cfg.epochs)]
    stages = [lrs.count(lr) for lr in sorted(set(lrs), reverse=True)]
    assert stages == [3 ** i for i in range(8)]  # 1 + 3 + ... + 2187 = 3280 epochs
    assert [round(lr / 1e-3, 12) for lr in sorted(set(lrs), reverse=True)] == [round(10 ** (-i / 7), 12) for i in range(8)]


def test_vae_options_reach_the_optimizer_the_schedule_and_the_evaluation(data_dir, tmp_path, monkeypatch):
    """Adam (fused) gets --adam-eps and, per epoch, the cosine schedule's lr; --batch-size sets the steps per epoch; --compile
    compiles the training step's terms; the test NLL draws --eval-samples importance samples per image; FID's network
    gets --fid-samples decoded prior samples and as many grey-level test images (not binarized) as 299 x 299 RGB,
    normalised with ImageNet's mean and std."""
    spy = spy_optimizer(torch.optim.Adam)
    monkeypatch.setattr(torch.optim, "Adam", spy)
    compiled, draws, recorder = [], [], RecordingFeatures()
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)
    real_bound = vae.iwae_bound

    def counted_bound(x, mu, logvar, log_likelihood, k):
        draws.append(k * len(x))
        return real_bound(x, mu, logvar, log_likelihood, k)
    monkeypatch.setattr(vae, "iwae_bound", counted_bound)
    monkeypatch.setattr(vae, "load_inception", lambda device: recorder)
    record = vae.main(["--data-dir", data_dir, "--out", str(tmp_path), *TINY, "--epochs", "3", "--batch-size", "64", "--lr", "2e-3",
                       "--adam-eps", "1e-5", "--compile", "--eval-samples", "24", "--fid", "--fid-samples", "40"])
    assert [s["lr"] for s in spy.steps] == pytest.approx([2e-3] * 4 + [1.5e-3] * 4 + [0.5e-3] * 4, rel=1e-12)
    assert all(s["eps"] == 1e-5 and tuple(s["betas"]) == (0.9, 0.999) for s in spy.steps)
    assert all(s["fused"] for s in spy.steps)  # one kernel for all parameters on the CPU too (bench.py: ~4x foreach)
    assert len(compiled) == 1 and sum(draws) == 24 * 64 and record["eval_samples"] == 24
    seen = torch.cat(recorder.inputs) * IMAGENET_STD + IMAGENET_MEAN
    assert seen.shape == (80, 3, 299, 299) and record["fid_samples"] == 40
    assert (seen - seen[:, :1]).abs().max() < 1e-5  # grey repeated to RGB
    grey = torch.from_numpy(fake_digits(64, 1)[:40]).float().div(255).view(40, 1, 28, 28)
    want = torch.nn.functional.interpolate(grey, size=(299, 299), mode="bilinear", align_corners=False)
    real, fake = (seen[40:], seen[:40]) if (seen[40:, :1] - want).abs().max() < 1e-5 else (seen[:40], seen[40:])
    assert (real[:, :1] - want).abs().max() < 1e-5  # the first 40 test images, grey levels
    assert fake.min() >= -1e-6 and fake.max() <= 1 + 1e-6 and (fake[:, :1] - want).abs().mean() > 0.05  # not test images


def test_vae_seed_decides_the_run(data_dir, tmp_path):
    """The same --seed trains the same weights; another seed, others."""
    weights = []
    for seed, out in (("0", "a"), ("0", "b"), ("1", "c")):
        vae.main(["--data-dir", data_dir, "--out", str(tmp_path / out), *TINY, "--epochs", "1", "--seed", seed])
        weights.append(torch.load(str(tmp_path / out / "ckpt.pt"), weights_only=True)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    vae.main(["--data-dir", data_dir, "--out", str(tmp_path / "a"), *TINY, "--epochs", "2", "--overwrite"])
    assert [r.get("epoch") for r in read_metrics(str(tmp_path / "a"))] == [1, 2, 2]  # a new run: a log of its own


# ----------------------------------------------------------------------------- evaluation

def test_importance_weighted_bound_is_above_the_elbo_and_grows_with_k():
    torch.manual_seed(0)
    model = vae.VAE(hidden=[64], latent_dim=4)
    x = vae.prepare_test_set(torch.tensor(fake_digits(256, 2), dtype=torch.float32).view(256, 784) / 255, "bernoulli")
    with torch.no_grad():
        mu, logvar = model.encode(x)
        bounds = {k: vae.iwae_bound(x, mu, logvar, model.log_likelihood, k) for k in (1, 5, 50)}
        elbo = vae.elbo(x, mu, logvar, model.log_likelihood)[0]
    for small, large in [(elbo, bounds[1]), (elbo, bounds[5]), (bounds[5], bounds[50])]:
        diff = large - small
        se = diff.std() / math.sqrt(len(diff))
        if small is elbo and large is bounds[1]:  # equal in expectation
            assert abs(diff.mean()) < 4 * se
        else:  # at least the smaller K; with an untrained encoder the gain is many standard errors
            assert diff.mean() > 4 * se


def test_chunked_nll_combines_chunks_exactly(monkeypatch):
    """K = 150 in chunks of 100 and 50 (and on the CPU each chunk decoded in pieces of 64) must give -L_150 of the
    very log-weights it drew: log (1/K) sum_k w_k over all 150, not an average of the chunks' bounds. The
    log-weights are recorded as they are drawn and recombined here independently."""
    torch.manual_seed(0)
    model = vae.VAE(hidden=[64], latent_dim=4)
    x = vae.prepare_test_set(torch.tensor(fake_digits(30, 3), dtype=torch.float32).view(30, 784) / 255, "bernoulli")
    drawn = []  # (x, z, log p(x|z)) of every decoder call, in order
    real_log_likelihood = model.log_likelihood

    def recorded(xs, z):
        out = real_log_likelihood(xs, z)
        drawn.append((xs, z, out))
        return out
    monkeypatch.setattr(model, "log_likelihood", recorded)
    nll = vae.test_nll(model, x, 150, rows=100)  # chunks of 100 and 50 samples, one image at a time
    assert [len(z) for _, z, _ in drawn[:4]] == [64, 36, 50, 64]  # pieces of the chunks
    total, pending = 0.0, []
    with torch.no_grad():
        for call in drawn:
            pending.append(call)
            if sum(len(z) for _, z, _ in pending) < 150:
                continue
            xs, z, log_px_z = pending[0][0], torch.cat([c[1] for c in pending]), torch.cat([c[2] for c in pending])
            mu, logvar = model.encode(xs)
            log_q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
            log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            total -= (torch.logsumexp(log_px_z + log_p - log_q, 0) - math.log(150)).double().sum().item()
            pending = []
    assert not pending and nll == pytest.approx(total / len(x), rel=1e-6)


def test_active_units_and_aggregate_posterior():
    mu = torch.zeros(1000, 3)
    mu[:, 0] = torch.randn(1000)  # varies with x: active
    mu[:, 1] = 0.05 * torch.randn(1000)  # variance 0.0025 < 0.01: inactive
    assert vae.active_units(mu) == 1
    mean, std = vae.aggregate_posterior(mu, torch.zeros(1000, 3))
    assert torch.allclose(std, (1 + mu.var(0, correction=0)).sqrt())
    assert torch.allclose(mean, mu.mean(0))


def test_aggregate_posterior_with_varying_variances():
    """q(z) = (1/N) sum_n N(mu_n, sigma_n^2): Var = E[sigma^2 + mu^2] - E[mu]^2, whatever the sigma_n."""
    torch.manual_seed(0)
    mu, logvar = torch.randn(500, 4, dtype=torch.float64), torch.randn(500, 4, dtype=torch.float64)
    mean, std = vae.aggregate_posterior(mu, logvar)
    var = (logvar.exp() + mu ** 2).mean(0) - mu.mean(0) ** 2
    assert torch.allclose(mean, mu.mean(0)) and torch.allclose(std, var.sqrt(), rtol=1e-12)


def test_the_kl_per_dimension_is_each_dimensions_closed_form_and_sums_to_the_kl():
    torch.manual_seed(0)
    mu, logvar = torch.randn(300, 5, dtype=torch.float64), torch.randn(300, 5, dtype=torch.float64)
    per_dim = vae.kl_per_dimension(mu, logvar)
    assert per_dim.shape == (5,)
    assert torch.allclose(per_dim, (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).mean(0), rtol=1e-12)
    assert per_dim.sum().item() == pytest.approx(vae.gaussian_kl(mu, logvar).mean().item(), rel=1e-12)


def test_mutual_information_is_zero_for_an_encoder_that_ignores_x_and_log_2_for_a_gaussian_channel():
    """An encoder that gives every x the same posterior: log q(z|x) = log q(z) for every z, so I = 0 exactly.
    x ~ N(0, I_2), q(z|x) = N(x, I): z = x + eps is jointly Gaussian with x, I(x; z) = 2 * 1/2 log(1 + 1/1) = log 2.
    The estimate differs from log 2 by the Monte Carlo error of its N terms, whose standard error the test computes
    from the same draws with the closed-form densities (log q(z) = log N(z; 0, 2 I)); from that same-draw mean it
    differs only through the finite mixture of N = 4,000 posteriors standing in for q(z) (measured: about 0.001)."""
    torch.manual_seed(0)
    same = torch.randn(1, 3, dtype=torch.float64).expand(500, 3)
    assert abs(vae.mutual_information(same, same.clone() - 1)) < 1e-12
    n = 4000
    x = torch.randn(n, 2, dtype=torch.float64)
    logvar = torch.zeros(n, 2, dtype=torch.float64)
    torch.manual_seed(1)
    estimate = vae.mutual_information(x, logvar, rows=2 ** 16)  # many chunks: they must join up exactly
    torch.manual_seed(1)
    z = vae.reparameterize(x, logvar)  # the estimator's draws
    terms = vae.log_normal(z, x, logvar) - vae.log_normal(z, torch.zeros(()), torch.tensor(math.log(2.0)))
    assert abs(estimate - math.log(2)) < 4 * terms.std().item() / math.sqrt(n)
    assert estimate == pytest.approx(terms.mean().item(), abs=5e-3)


def test_qq_points_of_an_aggregate_posterior_that_is_exactly_the_prior_lie_on_the_line():
    """mu(x) = sqrt(0.7) x, variance 0.3, x ~ N(0, 1): z = sqrt(0.7) x + sqrt(0.3) eps ~ N(0, 1) exactly. Each of the
    N sorted samples is within 5 standard errors, sqrt(p(1-p) / N) / phi(q_p) (an order statistic's), of the normal
    quantile q_p at p = (i + 1/2) / N, for p in [0.01, 0.99]; a dimension with std 1.1 is not."""
    torch.manual_seed(0)
    n = 10_000
    mu = math.sqrt(0.7) * torch.randn(n, 3, dtype=torch.float64)
    z = vae.reparameterize(mu, torch.full_like(mu, math.log(0.3)))
    q, sorted_z = vae.normal_qq(z)
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    assert torch.allclose(torch.special.ndtr(q), p, atol=1e-12) and torch.equal(sorted_z, z.sort(0).values)
    central = (p >= 0.01) & (p <= 0.99)
    se = (p * (1 - p) / n).sqrt() / torch.exp(-q ** 2 / 2) * math.sqrt(2 * math.pi)
    assert ((sorted_z - q[:, None]).abs()[central] < 5 * se[central, None]).all()
    _, wide = vae.normal_qq(1.1 * z)
    assert not ((wide - q[:, None]).abs()[central] < 5 * se[central, None]).all()


def test_latent_qq_png_draws_each_dimension_against_the_diagonal(tmp_path):
    """Panel 0 holds N(0, 1) samples: its black pixels lie on the grey diagonal (within a pixel where |q| < 2.5);
    panel 1 holds N(1.5, 1): its points are 1.5 * 63 / 8 = 12 pixels above it; 70 columns: only 64 panels."""
    torch.manual_seed(0)
    z = torch.randn(5000, 70)
    z[:, 1] += 1.5
    vae.save_qq(z, str(tmp_path / "q.png"))
    grid = torchvision.io.read_image(str(tmp_path / "q.png"))[0].int()
    assert grid.shape == (8 * 66 + 2, 8 * 66 + 2)  # 8 x 8 panels of 64 pixels, 2-pixel borders

    def offsets(c):  # for the columns of the panel's middle (|q| < 2.5), diagonal row minus the black pixels' rows
        panel = grid_tile(grid[None], 0, c, 64)[0]
        cols = [j for j in range(64) if abs((j / 63 * 8) - 4) < 2.5]
        return [63 - j - i for j in cols for i in (panel[:, j] == 0).nonzero()[:, 0].tolist()]
    assert offsets(0) and max(map(abs, offsets(0))) <= 1
    assert offsets(1) and all(10 <= d <= 14 for d in offsets(1))
    grey = (grid_tile(grid[None], 0, 0, 64)[0] == 153).nonzero()  # the line y = x (0.6) where no point covers it
    assert len(grey) and (grey.sum(1) == 63).all()  # row 63 - column: y = x, up to the right


def test_vae_fid_is_the_frechet_distance_of_prior_samples_and_test_images():
    torch.manual_seed(0)
    model = vae.VAE(hidden=[16], latent_dim=3)
    x_test = torch.rand(64, 784)
    net = stand_in_features(784)
    torch.manual_seed(2)
    d = vae.fid(model, x_test, 64, lambda images: net(images.double()))
    torch.manual_seed(2)
    with torch.no_grad():
        fake = net(torch.sigmoid(model.decode(torch.randn(64, 3))).double())
        real = net(x_test.double())
    assert d == pytest.approx(independent_frechet(real, fake), rel=1e-6)


def test_fid_with_a_stand_in_network(data_dir, tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 16))
    monkeypatch.setattr(vae, "load_inception", lambda device: net)
    record = vae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "1", *TINY, "--fid", "--fid-samples", "32"])
    assert record["fid_samples"] == 32 and math.isfinite(record["fid"]) and record["fid"] > 0


# ----------------------------------------------------------------------------- data, pictures, checkpoints, the command line

def test_load_mnist_reads_idx_files(tmp_path):
    train, test = make_mnist(str(tmp_path))
    x_train, x_test = vae.load_mnist(str(tmp_path), torch.device("cpu"))
    assert x_train.shape == (256, 784) and x_test.shape == (64, 784)
    assert x_train.dtype == torch.float32
    np.testing.assert_array_equal(x_train.numpy(), train.reshape(256, 784) / np.float32(255))
    np.testing.assert_array_equal(x_test.numpy(), test.reshape(64, 784) / np.float32(255))


def test_load_mnist_unpacks_gzipped_files(tmp_path):
    train, _ = make_mnist(str(tmp_path), gz=True)
    x_train, _ = vae.load_mnist(str(tmp_path), torch.device("cpu"))
    np.testing.assert_array_equal(x_train.numpy(), train.reshape(256, 784) / np.float32(255))


def test_every_output_is_written(trained):
    out, record = trained
    for name in ["ckpt.pt", "metrics.jsonl", "samples.png", "reconstructions.png", "interpolations.png", "latent_qq.png"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not os.path.exists(os.path.join(out, "manifold.png"))  # only for 2 latents
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    samples = torchvision.io.read_image(os.path.join(out, "samples.png"))
    assert samples.shape == (1, 8 * 30 + 2, 8 * 30 + 2)  # 8 x 8 digits of 28 pixels, 2-pixel borders
    final = [r for r in read_metrics(out) if r["kind"] == "eval"][0]  # (test_eval_only... may append another)
    assert final == record
    for key in ["test_nelbo", "test_nll", "eval_samples", "active_units", "posterior_mean", "posterior_std"]:
        assert key in final
    assert sum(final["kl_per_dim"]) == pytest.approx(final["test_kl"], rel=1e-5)  # float32 sums in other orders
    assert 0 <= final["mutual_information"] <= math.log(64) + 1e-6  # 64 test images: I(x; z) <= log N
    qq = torchvision.io.read_image(os.path.join(out, "latent_qq.png"))
    assert qq.shape == (1, 66 + 2, 4 * 66 + 2)  # one row of 4 panels (4 latents)
    assert final["eval_samples"] == 16 and 0 <= final["active_units"] <= 4
    assert len(final["posterior_mean"]) == len(final["posterior_std"]) == 4
    # the importance-sampled NLL is a tighter bound than the ELBO (K = 16 vs 1, 64 images)
    assert final["test_nll"] < final["test_nelbo"]


def test_pictures_show_what_their_docstrings_say(data_dir, tmp_path):
    """From a run with two latents (tanh, widths 48 and 32: a model built with these options must load its weights):
    reconstructions.png has test images 0-15 above the decoder means at their posterior means, then 16-31 likewise;
    interpolations.png row i goes in 10 equal steps from the posterior mean of test image i to that of 8 + i;
    samples.png decodes 64 draws of N(0, I) seeded with TEST_SEED; manifold.png is Kingma & Welling's figure 4: z1 at
    the 5%..95% normal quantiles from left to right, z2 from top (high) to bottom; latent_qq.png, drawn next, plots one
    draw of q(z|x) per test image. --eval-only draws them again."""
    vae.main(["--data-dir", data_dir, "--out", str(tmp_path / "run"), "--epochs", "1", *TINY, "--latent-dim", "2",
              "--hidden", "48", "32", "--activation", "tanh"])
    model = vae.VAE("mlp", [48, 32], 2, "tanh", "bernoulli")
    model.load_state_dict(torch.load(str(tmp_path / "run" / "ckpt.pt"), weights_only=True)["model"])
    model.eval()
    x = vae.prepare_test_set(torch.from_numpy(fake_digits(64, 1)).reshape(64, -1).float() / 255, "bernoulli")

    def picture(name, rows, cols):
        grid = torchvision.io.read_image(str(tmp_path / "run" / name))[0].int()
        return [[grid_tile(grid[None], r, c, 28)[0] for c in range(cols)] for r in range(rows)]

    def close(tile, image):  # within one grey level of the [0, 1] image (784,)
        return (tile - (image.detach().clamp(0, 1) * 255).round().int().view(28, 28)).abs().max() <= 1
    with torch.no_grad():
        mu, _ = model.encode(x[:32])
        recs = picture("reconstructions.png", 4, 16)
        for row, first in ((0, 0), (2, 16)):
            assert all(close(recs[row][c], x[first + c]) and close(recs[row + 1][c], model.mean(mu[first + c]))
                       for c in range(16)), row
        lines = picture("interpolations.png", 8, 10)
        assert all(close(lines[i][j], model.mean(mu[i] + j / 9 * (mu[8 + i] - mu[i]))) for i in range(8) for j in range(10))
        torch.manual_seed(vae.TEST_SEED)
        z = torch.randn(64, 2)
        samples = picture("samples.png", 8, 8)
        assert all(close(samples[i // 8][i % 8], model.mean(z[i])) for i in range(64))
        q = torch.special.ndtri(torch.linspace(0.05, 0.95, 20))
        manifold = picture("manifold.png", 20, 20)
        assert all(close(manifold[i][j], model.mean(torch.stack([q[j], q[19 - i]]))) for i in range(20) for j in range(20))
        vae.save_qq(vae.reparameterize(*model.encode(x)), str(tmp_path / "qq.png"))  # a sample of q(z|x) per test image
        assert (tmp_path / "qq.png").read_bytes() == (tmp_path / "run" / "latent_qq.png").read_bytes()
    vae.main(["--eval-only", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--data-dir", data_dir, "--device", "cpu",
              "--eval-samples", "16", "--out", str(tmp_path / "again")])
    for name in vae.PICTURES:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "run" / name).read_bytes(), name


def test_checkpoint_round_trip(tmp_path):
    cfg = vae.parse_args(["--hidden", "16", "--latent-dim", "3", "--out", str(tmp_path)])
    model = vae.VAE(cfg.arch, cfg.hidden, cfg.latent_dim, cfg.activation, cfg.likelihood)
    opt = torch.optim.Adam(model.parameters())
    vae.save_checkpoint(cfg.ckpt, model, opt, cfg, 7)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file is gone
    ckpt = torch.load(cfg.ckpt, weights_only=True)
    assert ckpt["epoch"] == 7 and ckpt["config"]["hidden"] == [16]
    ckpt = vae.load_checkpoint(cfg.ckpt)
    loaded = vae.VAE(**{key: ckpt["config"][key] for key in vae.MODEL_KEYS})
    loaded.load_state_dict(ckpt["model"])
    z = torch.randn(5, 3)
    assert torch.equal(loaded.decode(z), model.decode(z))
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("where", ["save_checkpoint", "save_pictures"])
def test_resume_equals_uninterrupted_run(where, data_dir, tmp_path, monkeypatch):
    """Interrupted (as by kill -9: nothing after it runs) after epoch 3 was logged, before its checkpoint (ckpt.pt
    holds epoch 2), or after the final evaluation was logged, and resumed: the log of a run that went straight
    through, every line once (an unfinished last line, as a full disk leaves it, dropped too)."""
    args = ["--data-dir", data_dir, "--epochs", "4", *TINY]
    vae.main([*args, "--out", str(tmp_path / "straight")])
    real = getattr(vae, where)

    def interrupted(*a, **kw):
        if where == "save_pictures" or kw["epoch"] == 3:
            raise KeyboardInterrupt
        real(*a, **kw)
    monkeypatch.setattr(vae, where, interrupted)
    assert run_main([*args, "--out", str(tmp_path / "resumed")]) == 130
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "epoch", "ep')  # and a last line that a full disk cut short
    monkeypatch.setattr(vae, where, real)
    vae.main([*args, "--out", str(tmp_path / "resumed"), "--resume"])

    def comparable(record):
        return {k: v for k, v in record.items() if k not in ("seconds", "images_per_s", "nll_seconds")}
    straight, resumed = read_metrics(str(tmp_path / "straight")), read_metrics(str(tmp_path / "resumed"))
    assert [r.get("epoch") for r in resumed] == [1, 2, 3, 4, 4]
    assert [comparable(r) for r in resumed] == [comparable(r) for r in straight]


def test_eval_only_reproduces_the_final_record(trained, data_dir, capsys):
    out, record = trained
    again = vae.main(["--eval-only", "--ckpt", os.path.join(out, "ckpt.pt"), "--data-dir", data_dir, "--device", "cpu", "--eval-samples", "16"])
    assert again["test_nll"] == record["test_nll"] and again["test_nelbo"] == record["test_nelbo"]
    assert read_metrics(out)[-1]["test_nll"] == record["test_nll"]
    assert "test NLL (K=16)" in capsys.readouterr().out


def test_help_works(capsys):
    assert run_main(["--help"]) == 0  # the program as a process: test_sigterm_ends_a_run_like_ctrl_c
    out = capsys.readouterr().out
    assert "--eval-samples" in out and "--preset" in out


# ============================================================================= kl_autoencoder.py

# ----------------------------------------------------------------------------- the objective: the gradients of one training step

def kl_objective_setup(seed=0):
    """A tiny autoencoder, a discriminator and a perceptual network in float64, and a batch."""
    torch.manual_seed(seed)
    model = kl.Trainable(kl.build("tiny")).double()
    with torch.no_grad():
        model.logvar.fill_(0.3)  # away from 0, where exp(s) = 1 would hide a missing division
    disc = kl.NLayerDiscriminator().double()
    perceptual = kl.Perceptual(random_vgg_features()).double()
    x = (torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1)
    return model, disc, perceptual, x


def stated_objective(model, disc, perceptual, x, hp, with_disc, seed):
    """THE OBJECTIVE of kl_autoencoder.py's docstring, written out here from the formulas alone."""
    ae = model.autoencoder
    moments = ae.quant_conv(ae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    torch.manual_seed(seed)
    z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)  # a posterior sample, not the mean
    x_rec = ae.decoder(ae.post_quant_conv(z))
    kl_per_image = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    lpips = perceptual(x, x_rec)  # one number per image, added to each of its pixels
    per_pixel = (x - x_rec).abs() + hp.perceptual_weight * lpips[:, None, None, None]
    s = model.logvar
    nll = (per_pixel / s.exp() + s).sum() / len(x)
    loss = nll + hp.kl_weight * kl_per_image.mean()
    if with_disc:
        g = -disc(x_rec).mean()
        last = ae.decoder.conv_out.weight
        lam = (torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
               / (torch.autograd.grad(g, last, retain_graph=True)[0].norm() + 1e-4)).clamp(0, 1e4).detach()
        loss = loss + hp.disc_weight * lam * g
    return loss, x_rec


KL_HP = dict(rec_loss="l1", perceptual_weight=0.7, kl_weight=0.05, disc_weight=0.5, disc_start=3, grad_clip=0.0,
             ema=0.0, precision="fp32")


@pytest.mark.parametrize("step", [2, 3], ids=["before-disc-start", "at-disc-start"])
def test_kl_train_step_applies_the_gradient_of_the_stated_objective(step):
    """The gradient train_step hands the autoencoder's optimizer is that of THE OBJECTIVE (KL averaged over the
    batch, a posterior sample decoded, perceptual per pixel, the learned s, the adversarial term with the adaptive
    weight at decoder.conv_out exactly from --disc-start on); the discriminator's is that of the hinge loss."""
    hp = kl.Config(**KL_HP)
    model, disc, perceptual, x = kl_objective_setup()
    ref_model, ref_disc = copy.deepcopy(model), copy.deepcopy(disc)
    opt, opt_d = Recorder(model.parameters()), Recorder(disc.parameters())
    torch.manual_seed(7)
    terms = kl.train_step(model, disc, x, step, opt=opt, opt_d=opt_d, cfg=hp, perceptual=perceptual)
    with_disc = step >= hp.disc_start
    loss, x_rec = stated_objective(ref_model, ref_disc, perceptual, x, hp, with_disc, seed=7)
    expected = torch.autograd.grad(loss, list(ref_model.parameters()))
    # float64 throughout but for the perceptual normaliser, which sums squares in float32: about 5e-8 apart
    assert relative_error(flat(opt.grads), flat(expected)) < 1e-6
    assert terms["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    if not with_disc:
        assert opt_d.grads is None and terms["d"].item() == 0 and terms["g"].item() == 0
        return
    d = 0.5 * (torch.relu(1 - ref_disc(x)).mean() + torch.relu(1 + ref_disc(x_rec.detach())).mean())
    assert relative_error(flat(opt_d.grads), flat(torch.autograd.grad(d, list(ref_disc.parameters())))) < 1e-6
    assert terms["d"].item() == pytest.approx(d.item(), rel=1e-6)


def test_kl_train_step_clips_the_gradient_and_moves_the_ema_towards_the_weights():
    model, disc, perceptual, x = kl_objective_setup()
    hp = kl.Config(**KL_HP)
    opt = Recorder(model.parameters())
    torch.manual_seed(7)
    kl.train_step(model, disc, x, 0, opt=opt, opt_d=Recorder(disc.parameters()), cfg=hp, perceptual=perceptual)
    norm = flat(opt.grads).norm().item()
    hp.grad_clip, hp.ema = norm / 10, 0.9
    ema = copy.deepcopy(model.autoencoder).requires_grad_(False)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in ema.parameters()]
    torch.manual_seed(7)
    kl.train_step(model, disc, x, 0, opt=opt, opt_d=Recorder(disc.parameters()), cfg=hp, perceptual=perceptual, ema=ema)
    assert flat(opt.grads).norm().item() == pytest.approx(norm / 10, rel=1e-6)  # clipped to --grad-clip
    for e, b, w in zip(ema.parameters(), before, model.autoencoder.parameters()):  # ema = 0.9 ema + 0.1 weights
        assert torch.allclose(e, 0.9 * b + 0.1 * w, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- model and loss

KL_CONFIGS = {
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1),
    "three-levels": dict(block_out_channels=(32, 64, 64), layers_per_block=2),
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
}


def diffusers_autoencoder(config, seed=0):
    """diffusers' AutoencoderKL at `config`, seeded. Its GroupNorm scales and all biases start at
    1 and 0, where swapping two norms or dropping a bias would go unnoticed: draw them too."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    n = len(config["block_out_channels"])
    ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                                  latent_channels=4, **config)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


@pytest.mark.parametrize("name, size", [("tiny", 32), ("three-levels", 32), ("sd", 32)])
def test_parity_with_diffusers(name, size):
    ref = diffusers_autoencoder(KL_CONFIGS[name])
    ours = kl.AutoencoderKL(latent_channels=4, **KL_CONFIGS[name]).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())  # the same keys, in the same order
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.manual_seed(1)
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        theirs, mine = ref.encode(x).latent_dist, ours.encode(x)
        z = theirs.mean
        pairs = {"mean": (mine.mean, theirs.mean), "logvar": (mine.logvar, theirs.logvar), "kl": (mine.kl(), theirs.kl()),
                 "decoded": (ours.decode(z), ref.decode(z).sample), "forward": (ours(x), ref(x).sample)}
    for what, (a, b) in pairs.items():
        assert a.shape == b.shape, what
        assert relative_error(a, b) <= 1e-5, f"{what}: relative error {relative_error(a, b):.2e}"
    # in float64 the same comparison shows that what is left in float32 is rounding, not a difference
    ref, ours, x = ref.double(), ours.double(), x.double()
    with torch.no_grad():
        assert relative_error(ours(x), ref(x).sample) <= 1e-12
        assert relative_error(ours.encode(x).logvar, ref.encode(x).latent_dist.logvar) <= 1e-12


def test_sd_preset_has_the_published_size():
    model = kl.build("sd")
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert len(model.state_dict()) == 248
    assert model.downsampling_factor == 8 and kl.build("sdxl").config["scaling_factor"] == 0.13025


def test_discriminator_is_ldms_patchgan():
    d = kl.NLayerDiscriminator()
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3


def test_perceptual_loss_trains_the_autoencoder_not_the_vgg(kl_data, tmp_path, monkeypatch):
    features = random_vgg_features()
    before = [p.detach().clone() for p in features.parameters()]
    monkeypatch.setattr(kl, "load_vgg16", lambda: features)
    out = str(tmp_path / "run")
    kl.main(["train", "--data", kl_data, *KL_TINY, "--perceptual-weight", "1", "--disc-weight", "0", "--steps", "4", "--out", out])
    assert all(torch.equal(a, b) for a, b in zip(before, features.parameters()))  # VGG untouched
    assert kl_records(out, "train")[-1]["perceptual"] > 0
    # and the perceptual term alone has a gradient in the autoencoder (LDM's diffusers port computes it under no_grad)
    perceptual, model = kl.Perceptual(features), kl.build("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    perceptual(x, model(x)).sum().backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0 and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.parameters())


def test_perceptual_term_reaches_the_autoencoder_in_training(kl_data, tmp_path, monkeypatch):
    """After one step from the same start, the decoder differs with the perceptual term on and off.
    (Adam's first step is lr * sign(gradient), so only a gradient that carries the term differs.)"""
    monkeypatch.setattr(kl, "load_vgg16", random_vgg_features)
    decoders = []
    for weight in ("0", "1"):
        out = str(tmp_path / f"w{weight}")
        kl.main(["train", "--data", kl_data, *KL_TINY, "--perceptual-weight", weight, "--disc-weight", "0", "--steps", "1", "--out", out])
        decoders.append(torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]["decoder.conv_out.weight"])
    assert not torch.equal(*decoders)


def test_perceptual_gradient_is_finite_where_features_vanish():
    perceptual = kl.Perceptual(random_vgg_features())
    x = torch.full((1, 3, 32, 32), -1.0, requires_grad=True)  # dark image: many ReLU features are exactly 0
    y = torch.full((1, 3, 32, 32), -0.9)
    perceptual(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_lpips_weights_file_is_loaded(tmp_path):
    perceptual = kl.Perceptual(random_vgg_features())
    torch.save({f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), 0.5 * i) for i, c in enumerate(kl.VGG_CHANNELS)}, tmp_path / "vgg.pth")
    kl.load_lpips_weights(perceptual, str(tmp_path / "vgg.pth"))
    assert perceptual.weights[3][0].item() == 1.5
    torch.save({"lin0.model.1.weight": torch.ones(3)}, tmp_path / "bad.pth")
    with pytest.raises(kl.UserError, match="not LPIPS"):
        kl.load_lpips_weights(perceptual, str(tmp_path / "bad.pth"))


# ----------------------------------------------------------------------------- Config and the training loop: what a run computes from its options

def test_part_one_is_a_complete_program(tmp_path):
    """Part I of kl_autoencoder.py uses nothing defined after it (every name it reads is its own, imported, or a
    builtin), and trains from a Config with its defaults for the device and precision ("auto"), in a folder that
    does not exist yet, on uint8 tensors: the copy a reader makes of it runs."""
    source = open(kl.__file__).read()
    part_one = source[source.index("# PART I:"):source.index("# PART II:")]
    tree, imported = ast.parse(part_one), {a.asname or a.name.split(".")[0] for n in ast.walk(ast.parse(source))
                                           if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
        t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)} | {
        a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in [*n.args, *n.kwonlyargs, n.vararg, n.kwarg]
        if a} | {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)} | {
        n.name for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler) and n.name}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used - defined - imported - set(dir(builtins)) == set()
    images = torch.from_numpy(smooth_images(12, 16)).permute(0, 3, 1, 2).contiguous()
    cfg = kl.Config(steps=3, batch_size=4, perceptual_weight=0, disc_weight=0, log_every=1, eval_every=2,
                    out=str(tmp_path / "new" / "run"))
    final, record = kl.train(cfg, dict(block_out_channels=(32, 64), layers_per_block=1), images[:8], images[8:])
    assert isinstance(final, kl.AutoencoderKL) and record["images"] == 4 and record["step"] == 3
    assert sorted(os.listdir(cfg.out)) == ["ckpt.pt", "metrics.jsonl", "reconstructions.png"]
    with pytest.raises(ValueError, match="perceptual"):  # a perceptual weight with no network is not ignored
        kl.train(dataclasses.replace(cfg, perceptual_weight=1.0), {}, images[:8], images[8:])


def test_config_holds_ldms_recipe_and_is_the_train_commands_options(capsys):
    """LDM's values (latent-diffusion's contperceptual.py and kl-f8 config; FACTS.md), with our two documented
    departures (--learn-logvar on; lr 1e-4 for one small GPU), and the train command's defaults are Config's."""
    ldm = kl.Config()
    assert (ldm.rec_loss, ldm.perceptual_weight, ldm.kl_weight, ldm.disc_weight, ldm.disc_start, ldm.betas) == \
        ("l1", 1.0, 1e-6, 0.5, 50001, (0.5, 0.9))
    assert (ldm.weight_decay, ldm.grad_clip, ldm.ema, ldm.learn_logvar, ldm.lr) == (0.0, 0.0, 0.0, True, 1e-4)
    args = kl.parse_args(["train", "--data", "x.npz", "--device", "cpu"])
    assert all(getattr(args, f.name) == getattr(ldm, f.name) for f in dataclasses.fields(kl.Config)
               if f.name not in ("precision", "device", "data", "workers"))  # settled by the command line:
    assert (args.precision, args.device, args.data, args.workers) == ("fp32", "cpu", "x.npz", 0)  # bf16 on CUDA
    args = kl.parse_args(["train", "--data", "x.npz", "--betas", "0.9", "0.99", "--no-learn-logvar", "--rec-loss", "mse"])
    assert (args.betas, args.learn_logvar, args.rec_loss) == ((0.9, 0.99), False, "mse")
    with pytest.raises(SystemExit):
        kl.parse_args(["train", "--help"])
    printed = "".join(capsys.readouterr().out.split())  # without the spaces and line breaks of argparse's wrapping
    assert all("".join(f.metadata["help"].split()) in printed for f in dataclasses.fields(kl.Config)
               if f.name != "precision")  # a run option, of eval too, with its own help
    for wrong in (["--disc-start", "1.5"], ["--lr", "0"], ["--rec-loss", "l2"], ["--kl-weight", "-1"]):
        with pytest.raises(kl.UserError, match=wrong[0]):
            kl.parse_args(["train", "--data", "x.npz", *wrong])


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """Data and weights for tests that compute by hand what a training step sees: 8 and 16 training images and 4
    held-out ones, 32 x 32, and a tiny autoencoder whose posterior is a point mass in practice (log-variance -30,
    std 3e-7: no posterior noise matters), saved as a .pt file for --weights."""
    root = tmp_path_factory.mktemp("frozen")
    paths = {}
    for name, n, seed in (("train", 8, 1), ("train16", 16, 3), ("val", 4, 2)):
        paths[name] = str(root / f"{name}.npz")
        np.savez(paths[name], images=smooth_images(n, 32, seed=seed))
    torch.manual_seed(0)
    model = kl.build("tiny")
    with torch.no_grad():
        c = model.config["latent_channels"]
        model.quant_conv.weight[c:] = 0
        model.quant_conv.bias[c:] = -30
    torch.save(model.state_dict(), str(root / "frozen.pt"))
    return types.SimpleNamespace(**paths, weights=str(root / "frozen.pt"), model=model.eval(),
                                 images=smooth_images(8, 32, seed=1))


def frozen_train(frozen, out, *flags, data=None):
    """kl train from the frozen weights on the 8 training images (one batch of all 8 per step), a log line per step;
    flags given here win. Returns the train records and the checkpoint."""
    data = data or ["--data", frozen.train, "--val-data", frozen.val]
    kl.main(["train", *data, "--weights", frozen.weights, "--preset", "tiny",
             "--resolution", "32", "--batch-size", "8", "--device", "cpu", "--perceptual-weight", "0", "--disc-weight", "0",
             "--log-every", "1", "--eval-every", "0", "--out", str(out), *flags])
    return kl_records(str(out), "train"), torch.load(os.path.join(str(out), "ckpt.pt"), weights_only=True)


def frozen_terms(model, images, flip=False):
    """What a step on uint8 (N, H, W, 3) images computes from the frozen weights: x in [-1, 1] (mirrored left-right
    with flip), its reconstruction from the posterior mean, and the KL per image in nats."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = x.flip(-1) if flip else x
    with torch.no_grad():
        posterior = model.encode(x)
        x_rec = model.decode(posterior.mean)
    mean, logvar = posterior.mean, posterior.logvar
    return x, x_rec, 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))


@pytest.mark.parametrize("flags", [[], ["--rec-loss", "mse", "--kl-weight", "0.5", "--perceptual-weight", "0.3", "--lr", "3e-4",
                                        "--weight-decay", "0.1", "--grad-clip", "0.01", "--compile"], ["--precision", "bf16"]],
                         ids=["defaults", "options", "bf16"])
def test_kl_train_options_reach_the_objective_and_the_optimizer(frozen, tmp_path, monkeypatch, flags):
    """The first step from weights with a point-mass posterior, computed by hand: the logged terms are THE OBJECTIVE's
    with the options given (s = 0 before the first step), and AdamW gets their lr, weight decay, LDM's betas and the
    gradients clipped to --grad-clip; --compile compiles the model."""
    monkeypatch.setattr(kl, "load_vgg16", random_vgg_features)
    spy = spy_optimizer(torch.optim.AdamW)
    monkeypatch.setattr(torch.optim, "AdamW", spy)
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    hp = {"rec_loss": "l1", "kl_weight": 1e-6, "perceptual_weight": 0.0, "lr": 1e-4, "weight_decay": 0.0, "grad_clip": 0.0}
    hp.update((f[2:].replace("-", "_"), v if f in ("--rec-loss", "--precision") else float(v))
              for f, v in zip(flags[::2], flags[1::2]) if f != "--compile")
    records, _ = frozen_train(frozen, tmp_path, "--steps", "1", *flags)
    x, x_rec, kl_per_image = frozen_terms(frozen.model, frozen.images)
    rec = ((x - x_rec).abs() if hp["rec_loss"] == "l1" else (x - x_rec) ** 2).mean().item()
    p = kl.Perceptual(random_vgg_features())(x, x_rec).mean().item() if hp["perceptual_weight"] else 0.0
    first = records[0]
    assert first["step"] == 1
    if "--precision" in flags:  # bf16 autocast: the networks in bfloat16 (8 bits of mantissa), not float32: 1.5e-4
        assert first["rec"] == pytest.approx(rec, rel=2e-2) and first["rec"] != pytest.approx(rec, rel=1e-5)  # measured
        return
    assert first["rec"] == pytest.approx(rec, rel=1e-5)
    assert first["kl"] == pytest.approx(kl_per_image.mean().item(), rel=1e-5)
    assert first["perceptual"] == pytest.approx(p, rel=1e-4, abs=1e-9)
    assert first["nll"] == pytest.approx(x[0].numel() * (rec + hp["perceptual_weight"] * p), rel=1e-5)
    assert first["loss"] == pytest.approx(first["nll"] + hp["kl_weight"] * first["kl"], rel=1e-6)
    step = spy.steps[0]
    assert (step["lr"], step["weight_decay"], tuple(step["betas"])) == (hp["lr"], hp["weight_decay"], (0.5, 0.9))
    if hp["grad_clip"]:
        assert step["grad_norm"] == pytest.approx(hp["grad_clip"], rel=1e-3)
    assert len(compiled) == ("--compile" in flags)


def test_kl_disc_ema_and_export_options_reach_the_run(frozen, tmp_path, monkeypatch):
    """--fid adds rFID to the final evaluation. --disc-start counts steps from 0: the adversarial term and the discriminator's Adam (LDM's betas) start at the
    step it names, the term weighted by --disc-weight and the adaptive lambda; the NLL divides by exp(s) of the step
    before; the EMA (--ema decay) starts at the initial weights, and --export writes the EMA."""
    spy, spy_d = spy_optimizer(torch.optim.AdamW), spy_optimizer(torch.optim.Adam)
    monkeypatch.setattr(torch.optim, "AdamW", spy)
    monkeypatch.setattr(torch.optim, "Adam", spy_d)
    monkeypatch.setattr(kl, "load_inception", lambda device: RecordingFeatures())
    export = tmp_path / "export" / "w.safetensors"
    records, ckpt = frozen_train(frozen, tmp_path / "run", "--steps", "3", "--disc-start", "1", "--disc-weight", "0.3",
                                 "--ema", "0.75", "--lr", "2e-4", "--fid", "--export", str(export), "--eval-every", "2")
    assert ["rfid" in r for r in kl_records(str(tmp_path / "run"), "eval")] == [False, True]  # --fid: the final one
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["g"] == records[0]["lambda"] == records[0]["d"] == 0
    assert len(spy_d.steps) == 2 and tuple(spy_d.steps[0]["betas"]) == (0.5, 0.9) and spy_d.steps[0]["lr"] == 2e-4
    npix = 3 * 32 * 32
    for before, r in zip(records, records[1:]):
        assert r["d"] > 0 and r["lambda"] > 0 and r["g"] != 0
        assert r["loss"] == pytest.approx(r["nll"] + 1e-6 * r["kl"] + 0.3 * r["lambda"] * r["g"], rel=1e-5)
        s = before["logvar"]  # s after the step before: the one this step's NLL used
        assert r["nll"] == pytest.approx(npix * (r["rec"] * math.exp(-s) + s), rel=1e-5)
    names = [name for name, _ in frozen.model.named_parameters()]
    w0, w1, w2 = ([w for w in step["weights"] if w.ndim > 0] for step in spy.steps)  # without s, the one scalar
    exported = kl.load_safetensors(str(export))
    d = 0.75
    for i, name in enumerate(names):  # e_k = d e_(k-1) + (1 - d) w_k, e_0 = w_0
        expected = d ** 3 * w0[i] + (1 - d) * (d ** 2 * w1[i] + d * w2[i] + ckpt["model"][name])
        assert torch.allclose(ckpt["ema"][name], expected, rtol=0, atol=1e-6), name
        assert torch.equal(exported[name], ckpt["ema"][name]), name


def test_kl_epochs_batch_size_and_log_lines(frozen, tmp_path):
    """--epochs 2 of --batch-size 4 on 8 images is 4 steps; a log line holds the means of the steps since the one
    before, a checkpoint in between does not cut that interval, and the run's last line covers the partial one."""
    every, ckpt = frozen_train(frozen, tmp_path / "every", "--epochs", "2", "--batch-size", "4")
    assert [r["step"] for r in every] == [1, 2, 3, 4] and ckpt["step"] == 4
    again, _ = frozen_train(frozen, tmp_path / "again", "--epochs", "2", "--batch-size", "4")
    again, _ = frozen_train(frozen, tmp_path / "again", "--epochs", "1", "--batch-size", "4", "--overwrite")
    assert [r["step"] for r in again] == [1, 2]  # a new run over an old one: a log of its own
    sparse, _ = frozen_train(frozen, tmp_path / "sparse", "--epochs", "2", "--batch-size", "4", "--log-every", "3",
                             "--ckpt-every", "2")
    assert [r["step"] for r in sparse] == [3, 4]
    for key in ("loss", "rec", "nll", "kl"):
        assert sparse[0][key] == pytest.approx(sum(r[key] for r in every[:3]) / 3, rel=1e-6), key
        assert sparse[1][key] == pytest.approx(every[3][key], rel=1e-6), key
    assert sparse[0]["logvar"] == pytest.approx(every[2]["logvar"], rel=1e-6)
    assert sparse[1]["logvar"] == pytest.approx(every[3]["logvar"], rel=1e-6)


def test_kl_batches_follow_a_new_permutation_each_epoch_and_hflip_mirrors_at_random(frozen, tmp_path):
    """With --lr 1e-30 the weights stay put, so each step's logged L1 (batch 1) is that of one training image, as it
    is or mirrored left-right (not upside down); each epoch shows every image once, in a new order; some steps
    mirror, some do not."""
    records, _ = frozen_train(frozen, tmp_path, "--lr", "1e-30", "--batch-size", "1", "--steps", "16", "--hflip")
    candidates = {}
    for flip in (False, True):
        x, x_rec, _ = frozen_terms(frozen.model, frozen.images, flip)
        for i, value in enumerate((x - x_rec).abs().mean(dim=(1, 2, 3)).tolist()):
            candidates[i, flip] = value
    seen = []
    for r in records:
        matches = [key for key, value in candidates.items() if abs(r["rec"] - value) <= 1e-5 * value]
        assert len(matches) == 1, (r["rec"], candidates)
        seen += matches
    epochs = [[i for i, _ in seen[:8]], [i for i, _ in seen[8:]]]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(8)) and epochs[0] != epochs[1]
    assert 0 < sum(flip for _, flip in seen) < 16
    records, _ = frozen_train(frozen, tmp_path / "seed1", "--lr", "1e-30", "--batch-size", "1", "--steps", "8", "--seed", "1")
    assert [candidates[i, False] for i in epochs[0]] != pytest.approx([r["rec"] for r in records], rel=1e-5)  # --seed


def test_kl_train_size_options_build_that_model(kl_data, tmp_path):
    export = tmp_path / "export" / "diffusion_pytorch_model.safetensors"
    kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "1", "--latent-channels", "3", "--block-out-channels", "32", "64",
             "64", "--layers-per-block", "2", "--export", str(export), "--out", str(tmp_path / "run")])
    state = torch.load(str(tmp_path / "run" / "ckpt.pt"), weights_only=True)["model"]
    assert state["encoder.conv_out.weight"].shape[0] == 6 and state["decoder.conv_in.weight"].shape[1] == 3
    assert [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(3)] == [32, 64, 64]
    assert "encoder.down_blocks.0.resnets.1.conv1.weight" in state and "encoder.down_blocks.0.resnets.2.conv1.weight" not in state
    config = json.loads((export.parent / "config.json").read_text())
    assert (config["latent_channels"], config["block_out_channels"], config["layers_per_block"]) == (3, [32, 64, 64], 2)


def test_kl_held_out_split_is_stratified_seeded_and_apart_from_training(frozen, tmp_path):
    """40 uniform images of distinct grey levels in 4 classes, --val-size 8: reconstructions.png shows the held-out
    images, two of each class; one step on all 32 others with the weights held still (--lr 1e-30) logs the mean L1
    of exactly those; another --seed holds out others, stratified too."""
    path = str(tmp_path / "levels.npz")
    levels = 10 + 5 * np.arange(40)
    np.savez(path, images=np.broadcast_to(levels[:, None, None, None], (40, 16, 16, 3)).astype(np.uint8),
             labels=np.arange(40) % 4)

    def held_out(out):
        grid = torchvision.io.read_image(str(out / "reconstructions.png"))
        return sorted((int(grid_tile(grid, 0, i, 16)[0, 8, 8]) - 10) // 5 for i in range(8))
    records, _ = frozen_train(frozen, tmp_path / "train", "--val-size", "8", "--resolution", "16", "--batch-size", "32",
                              "--steps", "1", "--lr", "1e-30", data=["--data", path])
    val = held_out(tmp_path / "train")
    assert sorted(np.bincount(np.array(val) % 4)) == [2, 2, 2, 2]
    x, x_rec, _ = frozen_terms(frozen.model, np.broadcast_to(levels[:, None, None, None], (40, 16, 16, 3)).astype(np.uint8))
    per_image = (x - x_rec).abs().mean(dim=(1, 2, 3))
    training = [i for i in range(40) if i not in val]
    assert records[0]["rec"] == pytest.approx(per_image[training].mean().item(), rel=1e-5)
    kl.main(["eval", "--weights", frozen.weights, "--preset", "tiny", "--data", path, "--val-size", "8", "--resolution", "16",
             "--seed", "1", "--device", "cpu", "--out", str(tmp_path / "seed1")])
    other = held_out(tmp_path / "seed1")
    assert other != val and sorted(np.bincount(np.array(other) % 4)) == [2, 2, 2, 2]


def test_kl_training_lowers_the_loss_and_learns_the_logvar(kl_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "40", "--disc-start", "20", "--out", out])
    logs = kl_records(out, "train")
    assert [r["step"] for r in logs] == list(range(4, 41, 4))
    # L1 over the first 4 steps is about 0.4; the mean over 4 steps moves by a few hundredths from
    # one log line to the next once it has come down, so a fall of 0.1 is learning, not noise
    assert logs[-1]["rec"] < logs[0]["rec"] - 0.1
    assert logs[-1]["g"] != 0 and logs[-1]["lambda"] > 0 and logs[0]["g"] == 0  # the discriminator joined at step 20
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] == 40 and ckpt["logvar"].item() != 0.0  # the learned log-variance moved
    printed = capsys.readouterr().out
    for name in ["PSNR", "dB", "SSIM", "KL", "latent std", "scaling factor"]:
        assert name in printed
    assert os.path.getsize(os.path.join(out, "reconstructions.png")) > 0
    final = kl_records(out, "eval")[-1]
    assert final["images"] == 16 and final["step"] == 40


def test_kl_logvar_is_learned_only_with_learn_logvar(kl_data, tmp_path):
    logvars = {}
    for flag in ("--learn-logvar", "--no-learn-logvar"):
        out = str(tmp_path / flag)
        kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "2", "--disc-weight", "0", flag, "--out", out])
        logvars[flag] = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["logvar"].item()
    assert logvars["--no-learn-logvar"] == 0.0 and logvars["--learn-logvar"] != 0.0


@pytest.fixture(scope="module")
def kl_straight(kl_data, tmp_path_factory):
    """(the options, the folder) of a 12-step run that went straight through."""
    args = ["train", "--data", kl_data, *KL_TINY, "--steps", "12", "--ckpt-every", "6", "--disc-start", "4", "--hflip",
            "--ema", "0.9", "--eval-every", "3", "--log-every", "3"]
    out = tmp_path_factory.mktemp("straight")
    kl.main([*args, "--out", str(out)])
    return args, out


@pytest.mark.parametrize("where, step, saved", [("log_line", 9, 6), ("evaluate", 6, 6), ("after the end", 12, 12)])
def test_kl_resume_equals_uninterrupted_run(where, step, saved, kl_straight, tmp_path, monkeypatch):
    """Interrupted (as by kill -9: nothing after it runs) after the log line of step 9, or during the evaluation of
    step 6, or after the final evaluation, and resumed: the same weights, and a log equal to that of a run that went
    straight through, every line once (periodic evaluations every 3 steps: some fall on checkpoints' steps)."""
    args, straight = kl_straight
    real = getattr(kl, "log_line" if where == "log_line" else "evaluate_and_log")

    def interrupted(*a, **kw):
        if where == "evaluate" and kw["step"] == step:
            raise KeyboardInterrupt  # before it logs its record
        result = real(*a, **kw)
        if (a[1]["step"] if where == "log_line" else kw["step"]) == step and where != "evaluate":
            raise KeyboardInterrupt
        return result
    monkeypatch.setattr(kl, real.__name__, interrupted)
    with pytest.raises(SystemExit) as e:
        kl.main([*args, "--out", str(tmp_path / "resumed")])
    assert e.value.code == 130 and torch.load(str(tmp_path / "resumed" / "ckpt.pt"), weights_only=True)["step"] == saved
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # and a last line that a full disk cut short: dropped too
    monkeypatch.setattr(kl, real.__name__, real)
    kl.main([*args, "--out", str(tmp_path / "resumed"), "--resume"])
    a, b = (torch.load(str(folder / "ckpt.pt"), weights_only=True) for folder in (straight, tmp_path / "resumed"))
    for part in ("model", "disc", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert torch.equal(a["logvar"], b["logvar"])

    def comparable(records):
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]
    assert comparable(kl_records(str(tmp_path / "resumed"), "train")) == comparable(kl_records(str(straight), "train"))
    assert kl_records(str(tmp_path / "resumed"), "eval") == kl_records(str(straight), "eval")
    assert [r["step"] for r in kl_records(str(tmp_path / "resumed"), "eval")] == [3, 6, 9, 12]


def test_torchrun_with_one_process_runs_the_distributed_code_and_matches_a_plain_run(kl_data, tmp_path):
    """Under torchrun even one process initialises the process group (gloo here, NCCL on a GPU) and wraps the model
    in DDP; with one rank, averaging changes nothing, so it ends with the plain run's weights, bit for bit."""
    args = ["train", "--data", kl_data, *KL_TINY, "--steps", "3", "--disc-start", "1"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             "kl_autoencoder.py", *args, "--out", str(tmp_path / "ddp")], cwd=HERE, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) on cpu gloo" in result.stdout  # the process group is there
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 there: the same kernels, the same sums
    try:
        kl.main([*args, "--out", str(tmp_path / "plain")])
    finally:
        torch.set_num_threads(threads)
    a, b = (torch.load(str(tmp_path / run / "ckpt.pt"), weights_only=True) for run in ("ddp", "plain"))
    for part in ("model", "disc"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


SAVE_EACH_RANKS_WEIGHTS = """
import sys, torch, kl_autoencoder as kl
nets, real_step = [], kl.train_step
def train_step(model, disc, *args, **kwargs):  # notes this process's networks
    nets[:] = [model.module, disc]
    return real_step(model, disc, *args, **kwargs)
kl.train_step = train_step
kl.main(sys.argv[2:])
torch.save([net.state_dict() for net in nets], sys.argv[1])
"""


def run_two_processes(argv, folder):
    """kl_autoencoder.py in two processes as torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE and a rendezvous
    address in their environment; gloo on the CPU), without torchrun's own process; output in folder/rank*.txt, and
    each process's final weights (autoencoder and s, discriminator) in folder/rank*.pt. Returns rank 0's stdout and
    whether both ranks ended with the same weights. Both are killed if either fails or they take over 4 minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    os.makedirs(folder, exist_ok=True)
    logs = [open(os.path.join(folder, f"rank{rank}.txt"), "w+") for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", SAVE_EACH_RANKS_WEIGHTS, os.path.join(folder, f"rank{rank}.pt"), *argv],
                              cwd=HERE, text=True, stdout=log,
                              stderr=subprocess.STDOUT, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank, log in enumerate(logs)]
    deadline = time.time() + 240
    try:
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    printed = [log.seek(0) or log.read() for log in logs]
    for log in logs:
        log.close()
    for p, text in zip(procs, printed):
        assert p.returncode == 0, text[-3000:]
    states = [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=True) for rank in range(2)]
    same = all(torch.equal(a[k], b[k]) for a, b in zip(*states) for k in a)
    return printed[0], same


def test_two_processes_train_like_one_with_twice_the_batch_and_resume_exactly(frozen, tmp_path):
    """Each of 2 processes takes its share of every global batch of the epoch's permutation (seeded by --seed and the
    epoch), gradients are averaged by DDP and the logged means over the ranks. From weights with a point-mass posterior
    (no noise), 2 processes of batch 4 train as 1 process of batch 8, over 2 epochs and through a --resume
    mid-epoch, until the discriminator starts (at step 3: its BatchNorm sees each process's own batch; its gradients
    and statistics are shared, so both ranks still end with the same weights); only rank 0 logs, evaluates, writes."""
    common = ["train", "--data", frozen.train16, "--val-data", frozen.val, "--weights", frozen.weights, "--preset", "tiny",
              "--resolution", "32", "--device", "cpu", "--perceptual-weight", "0", "--disc-weight", "0.5", "--disc-start", "3",
              "--log-every", "1", "--ckpt-every", "2", "--eval-every", "3", "--lr", "1e-3"]
    two = str(tmp_path / "two")
    printed, same = run_two_processes([*common, "--batch-size", "4", "--steps", "1", "--out", two], tmp_path / "logs1")
    assert "658,375 parameters" in printed and "2 process(es)" in printed and same  # stopped mid-epoch
    printed, same = run_two_processes([*common, "--batch-size", "4", "--steps", "4", "--out", two, "--resume"],
                                      tmp_path / "logs2")
    assert "resuming" in printed and same
    kl.main([*common, "--batch-size", "8", "--steps", "4", "--out", str(tmp_path / "one")])
    assert sorted(os.listdir(two)) == ["ckpt.pt", "metrics.jsonl", "reconstructions.png"]
    assert [r["step"] for r in kl_records(two, "eval")] == [3, 4]  # the log of one run to step 4 (not step 1's final)
    assert kl_records(two, "train")[-1]["d"] > 0  # the discriminator trained in the last step
    for kind, steps in (("train", [1, 2, 3]), ("eval", [3])):
        a = [r for r in kl_records(two, kind) if r["step"] in steps][-len(steps):]
        b = [r for r in kl_records(str(tmp_path / "one"), kind) if r["step"] in steps]
        assert [r["step"] for r in a] == [r["step"] for r in b] == steps, kind
        for ra, rb in zip(a, b):
            for key in ("loss", "rec", "nll", "kl", "logvar") if kind == "train" else ("psnr", "ssim", "kl"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (kind, ra["step"], key)
    assert len(kl_records(two, "train")) == 4 and len(kl_records(two, "eval")) == 2  # rank 0 alone wrote them


def test_a_resumed_run_takes_its_optimizer_settings_from_its_options(kl_data, tmp_path, capsys):
    """--resume continues the optimizers' moments, with this run's lr, betas and weight decay: a lower --lr, as the
    message of a diverged run advises, is honoured (not the saved one)."""
    args = ["train", "--data", kl_data, *KL_TINY, "--disc-weight", "0", "--out", str(tmp_path / "run")]
    kl.main([*args, "--steps", "1"])
    kl.main([*args, "--steps", "2", "--resume", "--lr", "1e-5", "--betas", "0.9", "0.99", "--weight-decay", "0.5"])
    assert "the optimizers continue with this run's --lr 1e-05 (was 0.001), --betas (0.9, 0.99) (was (0.5, 0.9)), " \
           "--weight-decay 0.5 (was 0.0)" in capsys.readouterr().err
    ckpt = torch.load(str(tmp_path / "run" / "ckpt.pt"), weights_only=True)
    group, group_d = ckpt["opt"]["param_groups"][0], ckpt["opt_d"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-5, (0.9, 0.99), 0.5)
    assert (group_d["lr"], tuple(group_d["betas"]), group_d["weight_decay"]) == (1e-5, (0.9, 0.99), 0)
    assert int(ckpt["opt"]["state"][0]["step"]) == 2  # the moments went on from step 1


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(kl_data, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = kl.reconstruction_loss

    def poisoned(x, x_rec, kind="l1"):
        calls["n"] += 1
        return real(x, x_rec, kind) * (float("nan") if calls["n"] > 5 else 1.0)
    monkeypatch.setattr(kl, "reconstruction_loss", poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "12", "--ckpt-every", "4", "--disc-weight", "0", "--out", out])
    assert e.value.code == 2
    kl_error(capsys, "nan", "last good step")
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 4


def test_kl_training_evaluates_the_ema_weights_when_it_keeps_them(kl_data, tmp_path):
    out = str(tmp_path / "run")
    final = kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "3", "--disc-weight", "0", "--ema", "0.5",
                     "--out", out])
    ckpt = os.path.join(out, "ckpt.pt")
    with_ema = kl.main(["eval", "--ckpt", ckpt, "--device", "cpu", "--ema", "--out", str(tmp_path / "e")])
    without = kl.main(["eval", "--ckpt", ckpt, "--device", "cpu", "--out", str(tmp_path / "w")])
    assert final == with_ema and with_ema["psnr"] != without["psnr"]


# ----------------------------------------------------------------------------- evaluation

class ConstantPosterior(nn.Module):
    """A stand-in autoencoder whose q(z|x) is N(c, exp(logvar)) in every latent element (a 1x1 convolution
    with zero weights, so that it runs in bf16 under autocast as the real encoder does)."""

    def __init__(self, c, logvar):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.copy_(torch.tensor([c] * 4 + [logvar] * 4))

    def encode(self, x):
        return kl.DiagonalGaussianDistribution(self.conv(x[:, :, ::2, ::2]))

    def decode(self, z):
        return torch.zeros(len(z), 3, 2 * z.shape[2], 2 * z.shape[3])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_kl_evaluate_reports_the_kl_and_latent_std_of_a_known_posterior(precision):
    """Latents N(3, 2^2): KL per image in closed form (in float32 even under bf16), the std of the samples about
    their mean (2, not sqrt(2^2 + 3^2)) within 6 standard errors, and the scaling factor 1/std (not 1/var)."""
    model = ConstantPosterior(3.0, math.log(4.0))
    torch.manual_seed(0)
    batches = [torch.rand(32, 3, 16, 16) * 2 - 1 for _ in range(2)]
    record = kl.evaluate(model, batches, precision)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        c, logvar = model.encode(batches[0]).parameters[0, [0, 4], 0, 0].double()  # what the encoder really gave
    elements = 4 * 8 * 8
    assert record["kl"] == pytest.approx(0.5 * elements * (c ** 2 + logvar.exp() - 1 - logvar).item(), rel=1e-6)
    std, n = (0.5 * logvar).exp().item(), 64 * elements
    assert abs(record["latent_std"] - std) <= 6 * std / math.sqrt(2 * (n - 1))
    assert abs(record["scaling_factor"] - 1 / std) <= 6 / std / math.sqrt(2 * (n - 1)) * 1.01


def test_kl_rfid_is_the_frechet_distance_of_the_features_of_inputs_and_reconstructions():
    torch.manual_seed(0)
    model = kl.build("tiny").eval()
    batches = [torch.rand(40, 3, 16, 16) * 2 - 1 for _ in range(2)]
    net = stand_in_features(3 * 16 * 16)
    record = kl.evaluate(model, batches, "fp32", features=lambda images: net(images.double()))
    real, fake = [], []
    with torch.no_grad():
        for x in batches:
            x_rec = model.decode(model.encode(x).mean)
            real.append(net((((x.clamp(-1, 1) + 1) * 127.5).round() / 255).double()))
            fake.append(net((((x_rec.clamp(-1, 1) + 1) * 127.5).round() / 255).double()))
    assert record["rfid"] == pytest.approx(independent_frechet(torch.cat(real), torch.cat(fake)), rel=1e-6)


def test_kl_eval_command_with_rfid(kl_data, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "2", "--disc-weight", "0", "--out", out])
    torch.manual_seed(0)
    monkeypatch.setattr(kl, "load_inception", lambda device: nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 8)).double())
    monkeypatch.setattr(kl, "inception_features", lambda net, x: net(x.double()))
    record = kl.main(["eval", "--ckpt", os.path.join(out, "ckpt.pt"), "--device", "cpu", "--fid"])
    assert math.isfinite(record["rfid"]) and record["rfid"] >= 0 and record["step"] == 2
    assert "rFID" in capsys.readouterr().out
    assert kl_records(out, "eval")[-1] == record


IMAGENET_MEAN, IMAGENET_STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def thirds(h, w, dot):
    """uint8 (h, w, 3): red, green and blue thirds along the longer side, a white square of `dot` pixels at the centre."""
    image = np.zeros((h, w, 3), np.uint8)
    long_axis = 1 if w > h else 0
    n = max(h, w) // 3
    for c in range(3):
        index = [slice(None), slice(None)]
        index[long_axis] = slice(c * n, (c + 1) * n)
        image[tuple(index) + (c,)] = 255
    image[h // 2:h // 2 + dot, w // 2:w // 2 + dot] = 255
    return image


def test_photos_are_read_as_shown_and_animations_by_their_first_frame(tmp_path):
    """A JPEG whose EXIF orientation says "turn 90 degrees clockwise" (6) is read turned, as PIL's exif_transpose and
    every viewer show it; an animated GIF gives its first frame."""
    PIL = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    photo = PIL.fromarray(thirds(16, 48, 1))  # 16 high, 48 wide: shown 48 high and 16 wide
    exif = PIL.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    shown = torch.from_numpy(np.array(ImageOps.exif_transpose(PIL.open(tmp_path / "photo.jpg")))).permute(2, 0, 1)
    read = kl.decode_image(str(tmp_path / "photo.jpg"))
    assert read.shape == shown.shape == (3, 48, 16) and (read.int() - shown.int()).abs().float().mean() < 2  # decoders
    frames = [PIL.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (40, 200)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    assert torch.equal(kl.decode_image(str(tmp_path / "moving.gif")), torch.full((3, 8, 8), 40, dtype=torch.uint8))


@pytest.mark.parametrize("fmt", ["png", "gif", "jpeg"])
def test_an_image_whose_header_states_a_huge_size_is_refused_before_it_is_decoded(fmt, tmp_path, monkeypatch):
    """PNG, GIF and JPEG files state their size in their header: image_size reads a real file's, and a file that
    states 65,000 x 65,000 pixels (34 GB decoded; a bomb of a few hundred bytes) on a machine of 16 GiB is one line
    that says so, not an allocation of the decoder that runs until the machine gives up."""
    PIL = pytest.importorskip("PIL.Image")
    PIL.fromarray(thirds(24, 40, 1)).save(tmp_path / f"a.{fmt}")
    data = bytearray((tmp_path / f"a.{fmt}").read_bytes())
    assert kl.image_size(data) == (24, 40) and kl.decode_image(str(tmp_path / f"a.{fmt}")).shape == (3, 24, 40)
    at = {"png": (16, ">II"), "gif": (6, "<HH"), "jpeg": (data.find(b"\xff\xc0") + 5, ">HH")}[fmt]  # jpeg: h, w
    data[at[0]:at[0] + struct.calcsize(at[1])] = struct.pack(at[1], 65_000, 65_000)
    (tmp_path / f"bomb.{fmt}").write_bytes(bytes(data))
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 4 * 2 ** 20}[name])
    with pytest.raises(kl.UserError, match=f"bomb.{fmt} \\(65000x65000 pixels\\) decoded needs at least 31.5 GiB, "
                                           "more than this machine's 16.0 GiB"):
        kl.decode_image(str(tmp_path / f"bomb.{fmt}"))


def test_kl_image_pipeline_pictures_and_rfid_inputs(tiny_weights, tmp_path, monkeypatch):
    """Through eval's reconstructions.png (held-out inputs above their reconstructions): images are resized on their
    shorter side and centre-cropped, RGB kept in order, 16-bit levels rounded to 8 bits; the bottom row decodes the
    posterior mean; a second eval draws the same picture; and rFID's network gets inputs and reconstructions as
    they are in [0, 1], resized bilinearly to 299 x 299 and normalised with ImageNet's mean and std."""
    PIL = pytest.importorskip("PIL.Image")
    folder = tmp_path / "images"
    folder.mkdir()
    PIL.fromarray(thirds(32, 96, 2)).save(folder / "a_big.png")  # resized to 16 x 48, then the green third
    level = np.arange(256).reshape(16, 16)
    grey16 = (level.clip(0, 254) * 257 + np.where(level % 2, 129, 128)).astype(np.uint16)
    PIL.fromarray(grey16 if DECODES_16_BITS else ((grey16 + 128) // 257).astype(np.uint8)).save(folder / "b_grey16.png")
    PIL.fromarray(thirds(48, 16, 1)).save(folder / "c_tall.png")  # centre-cropped: green, the dot at (8, 8)
    PIL.fromarray(thirds(16, 48, 1)).save(folder / "d_wide.png")
    red_blue = np.zeros((16, 16, 3), np.uint8)
    red_blue[:, :8, 0], red_blue[:, 8:, 2] = 200, 100  # square: left as it is, channels in order
    PIL.fromarray(red_blue).save(folder / "e_red_blue.png")
    recorder = RecordingFeatures()
    monkeypatch.setattr(kl, "load_inception", lambda device: recorder)
    outs = []
    for run in ("first", "second"):
        outs.append(tmp_path / run)
        kl.main(["eval", "--weights", tiny_weights, "--preset", "tiny", "--data", str(folder), "--val-data", str(folder),
                 "--resolution", "16", "--workers", "0", "--device", "cpu", "--fid", "--out", str(outs[-1])])
    picture = (outs[0] / "reconstructions.png").read_bytes()
    assert (outs[1] / "reconstructions.png").read_bytes() == picture
    grid = torchvision.io.decode_png(torch.frombuffer(bytearray(picture), dtype=torch.uint8)).int()
    inputs = torch.stack([grid_tile(grid, 0, i, 16) for i in range(5)])
    assert torch.equal(inputs[4], torch.from_numpy(red_blue).permute(2, 0, 1).int())
    green, dot = torch.tensor([0, 255, 0]).view(3, 1, 1).expand(3, 16, 16).clone(), torch.tensor([255, 255, 255])
    green[:, 8, 8] = dot
    assert torch.equal(inputs[2], green) and torch.equal(inputs[3], green)
    big = inputs[0]
    assert torch.equal(big[:, :5, 2:14], green[:, :5, 2:14]) and torch.equal(big[:, 12:, 2:14], green[:, 12:, 2:14])
    assert divmod(int(big[0].argmax()), 16) in {(7, 7), (7, 8), (8, 7), (8, 8)}  # the white square, blurred
    expected_grey = torch.from_numpy(level.clip(0, 254) + level % 2).int()  # x.5 + 1/514 rounds up, x.5 - 1/514 down
    expected_grey[15, 15] = 254 + 1  # the last pixel: 254 * 257 + 129
    assert torch.equal(inputs[1], expected_grey.expand(3, -1, -1))
    model = kl.build("tiny").eval()
    kl.load_weights(model, kl.load_safetensors(tiny_weights))
    x = inputs.float() / 127.5 - 1
    with torch.no_grad():
        x_rec = model.decode(model.encode(x).mean)
    expected_rec = ((x_rec.clamp(-1, 1) + 1) * 127.5).round().int()
    recs = torch.stack([grid_tile(grid, 1, i, 16) for i in range(5)])
    assert (recs - expected_rec).abs().max() <= 1
    assert len(recorder.inputs) == 4 and all(t.shape == (5, 3, 299, 299) for t in recorder.inputs)
    seen = [t * IMAGENET_STD + IMAGENET_MEAN for t in recorder.inputs[:2]]  # the first eval's one batch, both sides
    want = [torch.nn.functional.interpolate(images.float() / 255, size=(299, 299), mode="bilinear", align_corners=False)
            for images in (inputs, recs)]

    def same(a, b):
        return (a - b).abs().max() < 1e-2 / 255
    assert (same(seen[0], want[0]) and same(seen[1], want[1])) or (same(seen[0], want[1]) and same(seen[1], want[0]))


def test_eval_of_a_weights_file_uses_the_held_out_split_of_a_default_training_run(tiny_weights, tmp_path):
    images = smooth_images(1100, 16, seed=5)
    np.savez(str(tmp_path / "big.npz"), images=images)
    record = kl.main(["eval", "--weights", tiny_weights, "--preset", "tiny", "--data", str(tmp_path / "big.npz"), "--resolution", "16",
                      "--device", "cpu", "--out", str(tmp_path / "ev")])
    _, held_out = kl.split(1100, 1000, None, 0)  # train's defaults: --val-size 1000, --seed 0
    grid = torchvision.io.read_image(str(tmp_path / "ev" / "reconstructions.png"))
    top_row = torch.stack([grid[:, 2:18, 2 + 18 * i:18 + 18 * i] for i in range(8)])  # make_grid: padding 2
    assert record["images"] == 1000
    assert torch.equal(top_row, torch.from_numpy(images[held_out[:8].numpy()]).permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------- Part II: images and data, pretrained networks, weights files

def test_npz_loader_and_stratified_split(kl_data, tmp_path):
    data, labels = kl.load_images(kl_data, 16, "unused")
    assert len(data) == 96 and data[0].shape == (3, 16, 16) and data[0].dtype == torch.uint8
    train, val = kl.split(len(data), 16, labels, seed=3)
    assert len(val) == 16 and len(train) == 80 and not set(train.tolist()) & set(val.tolist())
    assert torch.bincount(labels[val]).tolist() == [4, 4, 4, 4]  # stratified: 96 images, 4 classes of 24
    assert torch.equal(kl.split(len(data), 16, labels, seed=3)[1], val)  # fixed by the seed
    images = np.zeros((4, 8, 8, 3), np.uint8)
    for dtype in (np.uint16, np.uint64, ">i8", bool):  # any integer labels (safetensors and torch lack some of these)
        np.savez(tmp_path / "labelled.npz", images=images, labels=(np.arange(4) % 2).astype(dtype))
        assert kl.load_images(str(tmp_path / "labelled.npz"), 8, "unused")[1].tolist() == [0, 1, 0, 1]


def test_stratified_split_rounds_to_the_exact_size():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    _, val = kl.split(100, 15, labels)
    assert len(val) == 15 and torch.bincount(labels[val]).tolist() == [8, 4, 3]  # shares 7.5, 4.5, 3.0


def test_folder_loader_finds_images_recursively_and_crops(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    torchvision.io.write_png(torch.zeros(3, 40, 60, dtype=torch.uint8), str(tmp_path / "a" / "wide.png"))
    torchvision.io.write_jpeg(torch.full((3, 50, 30), 200, dtype=torch.uint8), str(tmp_path / "a" / "b" / "tall.jpg"))
    (tmp_path / "notes.txt").write_text("not an image")
    data, labels = kl.load_images(str(tmp_path), 16, "unused")
    assert len(data) == 2 and labels is None
    assert all(data[i].shape == (3, 16, 16) for i in range(2))
    other = tmp_path.parent / f"{tmp_path.name}_other"  # a linked folder is searched too, and a link back to a parent
    other.mkdir()  # folder (a loop) reads that folder once
    torchvision.io.write_png(torch.zeros(3, 16, 16, dtype=torch.uint8), str(other / "linked.png"))
    os.symlink(other, tmp_path / "a" / "more")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")
    assert [os.path.basename(f) for f in kl.load_images(str(tmp_path), 16, "unused")[0].files] == [
        "tall.jpg", "linked.png", "wide.png"]  # (sorted by path: a/b, a/more, a)


def test_torchvision_loader_reads_mnist_as_rgb(tmp_path):
    make_mnist(str(tmp_path))
    data, labels = kl.load_images("mnist", 32, str(tmp_path))
    assert len(data) == 256 and data[0].shape == (3, 32, 32) and torch.equal(data[0][0], data[0][1]) and len(labels) == 256


def test_every_image_depth_and_mode_is_read_as_8_bit_rgb(tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    PIL.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 16 bits: v * 257 is v in 8 bits
    PIL.fromarray(grey, "L").save(tmp_path / "grey.png")
    PIL.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 7)]), "RGBA").save(tmp_path / "rgba.png")
    PIL.fromarray(grey, "L").convert("P").save(tmp_path / "palette.png")
    if not DECODES_16_BITS:  # before torchvision 0.20: one line, not garbage
        with pytest.raises(kl.UserError, match="grey16.png as an image .*8-bit"):
            kl.decode_image(str(tmp_path / "grey16.png"))
    for name in ("grey16.png",) * DECODES_16_BITS + ("grey.png", "rgba.png", "palette.png"):
        image = kl.decode_image(str(tmp_path / name))
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16), name
        assert torch.equal(image, torch.from_numpy(grey).expand(3, -1, -1)), name
    # the same conversion for arrays: grey + alpha and RGBA npz images
    for channels in (2, 4):
        path = str(tmp_path / f"c{channels}.npz")
        np.savez(path, images=np.stack([np.dstack([grey] * (channels - 1) + [np.full_like(grey, 7)])] * 4))
        data, _ = kl.load_images(path, 16, "unused")
        assert torch.equal(data[0], torch.from_numpy(grey).expand(3, -1, -1)), channels


class RunsCode:
    """An object whose unpickling would call open(marker, "w"), as a malicious .ckpt would call anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("module", [vae, kl])
def test_load_pretrained_checks_the_hash_in_the_name_on_every_load_and_unpickles_only_tensors(module, tmp_path, monkeypatch):
    """A file whose name carries its own sha256 prefix passes the hash check, so weights_only=True is the
    second lock: a code-running pickle is still refused unread, and a state dict of tensors loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"

    def named_by_its_hash(obj, stem):
        torch.save(obj, str(tmp_path / "f.pth"))
        data = (tmp_path / "f.pth").read_bytes()
        return f"https://example.invalid/{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth", data
    marker = tmp_path / "ran"
    url, data = named_by_its_hash({"w": RunsCode(str(marker))}, "evil")
    hub.mkdir(parents=True)
    (hub / os.path.basename(url)).write_bytes(data)
    with pytest.raises(module.UserError, match="UnpicklingError"):
        module.load_pretrained(url, "a test")
    assert not marker.exists()

    state = {"w": torch.arange(3.0)}
    url, data = named_by_its_hash(state, "net")
    downloads = []

    def download(url, dst, hash_prefix=None, progress=True):  # torch.hub's: checks the prefix as it downloads
        downloads.append(hash_prefix)
        open(dst, "wb").write(data)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        assert torch.equal(module.load_pretrained(url, "a test")["w"], state["w"])
    assert downloads == [url[-12:-4]]  # downloaded once, with the hash from its name
    (hub / os.path.basename(url)).write_bytes(data[:-1] + b"x")  # changed after the download
    with pytest.raises(module.UserError, match="sha256 begins"):
        module.load_pretrained(url, "a test")
    (hub / os.path.basename(url)).write_bytes(data)

    def out_of_memory(*args, **kwargs):  # as reading or unpickling a huge file planted under the name would
        raise MemoryError
    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(module.UserError, match="MemoryError"):
        module.load_pretrained(url, "a test")


SAFETENSORS_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                      torch.int16, torch.int8, torch.uint8, torch.bool]


def sample_tensors(dtype):
    torch.manual_seed(0)
    values = torch.randn(3, 5, 2) * 50
    return {"weights": values.to(dtype).clone(), "scalar": torch.tensor(7).to(dtype), "empty": torch.zeros(0, 4, dtype=dtype),
            "row": values[0, :, 0].to(dtype).clone()}


@pytest.mark.parametrize("dtype", SAFETENSORS_DTYPES)
def test_safetensors_reader_matches_the_safetensors_package(tmp_path, dtype):
    st = pytest.importorskip("safetensors.torch")
    tensors = sample_tensors(dtype)
    st.save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    loaded = kl.load_safetensors(str(tmp_path / "a.safetensors"))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t), name
    # and our writer produces what the package reads
    kl.save_safetensors(tensors, str(tmp_path / "b.safetensors"), metadata={"format": "pt"})
    for name, t in st.load_file(str(tmp_path / "b.safetensors")).items():
        assert torch.equal(t, tensors[name]), name


def test_safetensors_round_trip_without_the_package(tmp_path):
    tensors = {f"t{i}": t for i, t in enumerate(sample_tensors(torch.bfloat16).values())}
    kl.save_safetensors(tensors, str(tmp_path / "w.safetensors"))
    loaded = kl.load_safetensors(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def raw_safetensors(header, data, length=None):
    blob = json.dumps(header).encode()
    return (length if length is not None else len(blob)).to_bytes(8, "little") + blob + data


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "b": {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}}


@pytest.mark.parametrize("make, words", [
    (lambda good: good[:-5], "truncated"),
    (lambda good: good[:5], "shorter than the 8-byte header"),
    (lambda good: raw_safetensors({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, bytes(16)), "truncated"),
    (lambda good: raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                   "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)), "overlapping"),
    (lambda good: raw_safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)), "gap"),
    (lambda good: raw_safetensors({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)), "unknown dtype"),
    (lambda good: raw_safetensors(GOOD, bytes(24), length=2 ** 60), "header length"),
    (lambda good: raw_safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16)), "needs 12"),
    (lambda good: raw_safetensors({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)), "invalid shape"),
    (lambda good: raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, bytes(16)), "invalid data_offsets"),
    (lambda good: b"\x10" + bytes(7) + b"not json at all!" + bytes(8), "not valid JSON"),
    (lambda good: raw_safetensors([1, 2], b""), "not a JSON object"),
    (lambda good: raw_safetensors({"__metadata__": [1], **GOOD}, bytes(24)), "__metadata__ is not a map of strings"),
    (lambda good: raw_safetensors({"__metadata__": {"config": 5}, **GOOD}, bytes(24)), "__metadata__"),
    (lambda good: (200_000).to_bytes(8, "little") + b"[" * 200_000, "not valid JSON"),
    (lambda good: good + b"extra", "trailing bytes"),
])
def test_malformed_safetensors_are_rejected(tmp_path, make, words):
    good = raw_safetensors(GOOD, bytes(24))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(good))
    with pytest.raises(kl.UserError, match=words):
        kl.load_safetensors(str(path))


def test_duplicate_names_are_rejected(tmp_path):
    blob = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'
    (tmp_path / "dup.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(2))
    with pytest.raises(kl.UserError, match="duplicate"):
        kl.load_safetensors(str(tmp_path / "dup.safetensors"))


@given(st.data())
@settings(max_examples=200)
def test_corrupted_safetensors_never_crash_the_reader(tmp_path_factory, data):
    """Any byte flipped or any cut: the reader either returns tensors or refuses the file with a UserError."""
    good = bytearray(raw_safetensors(GOOD, bytes(range(24))))
    for _ in range(data.draw(st.integers(1, 4))):
        good[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    blob = bytes(good[:data.draw(st.integers(0, len(good)))])
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(blob)
    try:
        tensors = kl.load_safetensors(str(path))
    except kl.UserError:
        return
    assert sum(t.numel() * t.element_size() for t in tensors.values()) <= len(blob)


def test_the_safetensors_files_we_write_open_in_the_safetensors_package(tiny_weights, tmp_path):
    """Latents, a diffusers export and an LDM export: the package reads every tensor as we do, the header is padded
    to 8 bytes, and the metadata are strings (JSON where they hold structure)."""
    safetensors = pytest.importorskip("safetensors")
    folder = tmp_path / "images"
    folder.mkdir()
    write_test_image(folder / "a.png", 32, 32)
    common = ["--weights", tiny_weights, "--preset", "tiny", "--device", "cpu"]
    kl.main(["encode", *common, "--data", str(folder), "--resolution", "32", "--out", str(tmp_path / "lat.safetensors")])
    kl.main(["convert", *common[:4], "--export", str(tmp_path / "d" / "diffusion_pytorch_model.safetensors")])
    kl.main(["convert", *common[:4], "--export-format", "ldm", "--export", str(tmp_path / "ldm.safetensors")])
    for path in (tmp_path / "lat.safetensors", tmp_path / "d" / "diffusion_pytorch_model.safetensors", tmp_path / "ldm.safetensors"):
        assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0, path
        ours = kl.load_safetensors(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(ours) and all(torch.equal(f.get_tensor(k), ours[k]) for k in ours), path
            metadata = f.metadata()
        assert metadata["format"] == "pt" and all(isinstance(v, str) for v in metadata.values()), path
        for key in ("config", "names"):
            if key in metadata:
                json.loads(metadata[key])


def test_legacy_attention_names_and_4d_weights_load():
    ref = diffusers_autoencoder(KL_CONFIGS["tiny"])
    legacy = {}
    for name, tensor in ref.state_dict().items():
        for new, old in [("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")]:
            if f".attentions.0.{new}." in name:
                name = name.replace(f".{new}.", f".{old}.")
                tensor = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
        legacy[name] = tensor
    assert any(".query." in n for n in legacy) and any(v.ndim == 4 and ".proj_attn." in n for n, v in legacy.items())
    ours = kl.load_weights(kl.build("tiny").eval(), legacy)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert relative_error(ours(x), ref(x).sample) <= 1e-5


def test_load_weights_names_what_does_not_fit():
    state = kl.build("tiny").state_dict()
    with pytest.raises(kl.UserError, match=r"1 missing, e.g. decoder.conv_out.bias"):
        kl.load_weights(kl.build("tiny"), {k: v for k, v in state.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(kl.UserError, match=r"1 unexpected, e.g. extra.weight"):
        kl.load_weights(kl.build("tiny"), {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(kl.UserError, match=r"keys .* missing"):  # weights of another preset
        kl.load_weights(kl.build("small"), state, which="preset small")


def test_export_loads_into_diffusers(kl_data, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    exported = tmp_path / "exported" / "diffusion_pytorch_model.safetensors"
    kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "2", "--disc-weight", "0", "--out", str(tmp_path / "run"), "--export", str(exported)])
    ref = diffusers.AutoencoderKL.from_pretrained(str(exported.parent)).eval()
    ours = kl.build("tiny")
    ours.load_state_dict(torch.load(str(tmp_path / "run" / "ckpt.pt"), weights_only=True)["model"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert relative_error(ours.eval()(x), ref(x).sample) <= 1e-5


def test_export_never_pairs_weights_with_another_models_config(tiny_weights, tmp_path, capsys):
    """diffusers loads a folder's weights with its config.json: exporting into a folder whose config.json describes
    another model is refused (nothing written), and with --overwrite both files are replaced together."""
    folder = tmp_path / "vae"
    folder.mkdir()
    other = json.loads(json.dumps(kl.diffusers_config(kl.build("tiny", latent_channels=8).config)))
    (folder / "config.json").write_text(json.dumps(other))
    argv = ["convert", "--weights", tiny_weights, "--preset", "tiny", "--export", str(folder / "diffusion_pytorch_model.safetensors")]
    with pytest.raises(SystemExit) as e:
        kl.main(argv)
    assert e.value.code == 2
    kl_error(capsys, "config.json", "another model", "--overwrite")
    assert sorted(os.listdir(folder)) == ["config.json"] and json.loads((folder / "config.json").read_text()) == other
    kl.main([*argv, "--overwrite"])
    assert json.loads((folder / "config.json").read_text())["latent_channels"] == 4
    state = kl.load_safetensors(str(folder / "diffusion_pytorch_model.safetensors"))
    assert state["decoder.conv_in.weight"].shape[1] == 4


def test_kl_writes_are_atomic(tmp_path, monkeypatch):
    """An interrupted write (here: once the .tmp is written, before it is renamed) leaves the previous file as it was
    and no stray .tmp."""
    kl.save_checkpoint(str(tmp_path / "ckpt.pt"), {"step": 1})
    kl.write_image(torch.zeros(3, 8, 8), str(tmp_path / "image.png"))
    before = (tmp_path / "image.png").read_bytes()

    def interrupt(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        kl.save_checkpoint(str(tmp_path / "ckpt.pt"), {"step": 2})
    with pytest.raises(KeyboardInterrupt):
        kl.write_image(torch.ones(3, 8, 8), str(tmp_path / "image.png"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "image.png"]
    assert torch.load(str(tmp_path / "ckpt.pt"), weights_only=True)["step"] == 1 and (tmp_path / "image.png").read_bytes() == before


# ----------------------------------------------------------------------------- Part III: Stable Diffusion files

SD_CONFIGS = {  # a diffusers config each (what a vae/config.json holds), small enough for the CPU
    "sd-like": dict(block_out_channels=[32, 64, 64], layers_per_block=2, latent_channels=4, scaling_factor=0.18215),
    "flux-like": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=16, use_quant_conv=False,
                      use_post_quant_conv=False, mid_block_add_attention=False, scaling_factor=0.3611, shift_factor=0.1159),
    "sdxl-like": dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, act_fn="gelu", norm_num_groups=16,
                      scaling_factor=0.13025, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.5, 1.0],
                      force_upcast=False),
    # attention after each residual block of some levels (LDM's kl-f32, VA-VAE), unlike on the two sides
    "attention-levels": dict(block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4,
                             down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                             up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]),
}


def diffusers_reference(name, sample_size=32):
    """diffusers' AutoencoderKL of one SD_CONFIGS entry in float64, its 1-d parameters drawn too, and its config.json."""
    diffusers = pytest.importorskip("diffusers")
    n = len(SD_CONFIGS[name]["block_out_channels"])
    config = {"_class_name": "AutoencoderKL", "down_block_types": ["DownEncoderBlock2D"] * n,
              "up_block_types": ["UpDecoderBlock2D"] * n, "sample_size": sample_size, **SD_CONFIGS[name]}
    torch.manual_seed(0)
    return with_drawn_vectors(diffusers.AutoencoderKL.from_config(config).double().eval()), config


@torch.no_grad()
def with_drawn_vectors(ref):
    """ref with 0.1 N(0, 1) added to its 1-d parameters (biases, norms' scales), which start at 0 or 1 (and would hide
    a swapped scale and shift)."""
    for p in ref.parameters():
        if p.ndim == 1:
            p.add_(0.1 * torch.randn_like(p))
    return ref


def ldm_state_dict(state, levels):
    """diffusers names -> CompVis/LDM names and shapes, written out here independently of kl_autoencoder.py
    (and checked against diffusers' own converter in the test)."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for name, tensor in state.items():
        p = name.split(".")
        if p[1] in ("down_blocks", "up_blocks"):
            level = p[2] if p[1] == "down_blocks" else str(levels - 1 - int(p[2]))
            kind = {"resnets": ["block", p[4]], "downsamplers": ["downsample"], "upsamplers": ["upsample"],
                    "attentions": ["attn", p[4]]}[p[3]]
            if p[3] == "attentions":  # LDM's AttnBlock: norm, q, k, v, proj_out, the matrices as 1x1 convolutions
                tensor = tensor if p[5] == "group_norm" or p[-1] == "bias" else tensor[:, :, None, None]
                p = p[:5] + [attention[p[5]], p[-1]]
            p = [p[0], "down" if p[1] == "down_blocks" else "up", level, *kind, *p[5:]]
        elif p[1] == "mid_block" and p[2] == "resnets":
            p = [p[0], "mid", f"block_{int(p[3]) + 1}", *p[4:]]
        elif p[1] == "mid_block":
            p = [p[0], "mid", "attn_1", attention[p[4]], p[-1]]
            if p[3] != "norm" and p[-1] == "weight":
                tensor = tensor[:, :, None, None]
        out[".".join({"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out"}.get(x, x) for x in p)] = tensor
    return out


def assert_same_model(ours, ref, size=32, tolerance=1e-12):
    """Our model and diffusers' give the same posterior and decoding in float64."""
    ours = ours.double().eval()
    x = torch.rand(2, ours.config["in_channels"], size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert relative_error(ours.encode(x).mean, ref.encode(x).latent_dist.mean) <= tolerance
        assert relative_error(ours.encode(x).logvar, ref.encode(x).latent_dist.logvar) <= tolerance
        assert relative_error(ours(x), ref(x).sample) <= tolerance


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_community_vae_files_with_their_trainings_leftovers_and_ema_copies_load(fmt, tmp_path, capsys):
    """A VAE file as LDM's first-stage training writes it (and community files such as vae-ft-mse-840000-ema keep):
    LDM names, the loss's networks (loss.*), LitEma's counters and its copies of every weight (model_ema. + the name
    without dots). The leftovers are ignored with one line, the weights load, --ema loads the copies instead; an
    unknown key is still refused."""
    torch.manual_seed(0)
    weights, copies = kl.build("tiny"), kl.build("tiny")
    state = {**kl.to_ldm(weights.state_dict(), weights.config), "loss.logvar": torch.zeros(()),
             "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
             "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32),
             **{"model_ema." + k.replace(".", ""): v for k, v in kl.to_ldm(copies.state_dict(), copies.config).items()},
             "model_ema.losslogvar": torch.zeros(())}  # LitEma copies every parameter of LDM's model, the loss's too
    path = str(tmp_path / f"vae.{fmt}")
    torch.save({"state_dict": state}, path) if fmt == "ckpt" else kl.save_safetensors(state, path)
    for ema, expected in ((False, weights), (True, copies)):
        model = kl.load_weights(kl.build("tiny"), kl.read_weights(path), path, ema=ema)
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in model.state_dict().items())
        note = capsys.readouterr().err
        assert "ignored 6 tensors of its training (loss.discriminator, loss.logvar, loss.perceptual_loss, " \
               "model_ema.decay, model_ema.losslogvar, model_ema.num_updates)" in note
        assert ("loaded its EMA weights" if ema else "not the EMA's (124 tensors; --ema loads them)") in note
    with pytest.raises(kl.UserError, match="1 unexpected, e.g. lossy.weight"):
        kl.fit_weights({**state, "lossy.weight": torch.zeros(1)}, kl.build("tiny").config, path)
    with pytest.raises(kl.UserError, match="no EMA weights"):
        kl.fit_weights(kl.to_ldm(weights.state_dict(), weights.config), weights.config, path, ema=True)


@pytest.mark.parametrize("name", ["sd-like", "flux-like"])
def test_ldm_files_load_with_and_without_prefix_from_safetensors_and_ckpt(tmp_path, name):
    ref, config = diffusers_reference(name)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ldm = ldm_state_dict(ref.state_dict(), len(config["block_out_channels"]))
    # LDM's up.0 is the full-resolution level (diffusers' last up block): it has no upsampler
    assert "encoder.mid.block_1.norm1.weight" in ldm and not any(k.startswith("decoder.up.0.upsample") for k in ldm)
    # the test's map is diffusers' map: diffusers' converter takes it back exactly
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, config)
    assert back.keys() == ref.state_dict().keys() and all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    whole_sd = {"model.diffusion_model.out.0.weight": torch.zeros(3), "cond_stage_model.x": torch.zeros(2)}
    variants = {"plain": ldm, "first_stage_model.": {**whole_sd, **{"first_stage_model." + k: v for k, v in ldm.items()}},
                "vae.": {"vae." + k: v for k, v in ldm.items()}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for variant, state in variants.items():
        for ext in (".safetensors", ".ckpt"):
            path = str(tmp_path / f"vae{ext}")
            if ext == ".safetensors":
                kl.save_safetensors(state, path)
            else:  # a whole training checkpoint, as SD's .ckpt files are
                torch.save({"state_dict": state, "global_step": 470000}, path)
            ours = kl.AutoencoderKL(**kl.read_config(str(tmp_path / "config.json"))).double()
            kl.load_weights(ours, kl.read_weights(path), path)
            assert_same_model(ours, ref)


def test_ldm_names_cover_every_weight_and_name_it_as_diffusers_converter_expects():
    for preset in ("sd", "sd3"):
        model = kl.build(preset)
        table = kl.ldm_names(model.config)
        ldm = ldm_state_dict(model.state_dict(), 4)
        assert set(table) == set(model.state_dict()) and sorted(table.values()) == sorted(ldm)
        exported = kl.to_ldm(model.state_dict(), model.config)
        assert all(exported[k].shape == v.shape for k, v in ldm.items())  # attention as [C, C, 1, 1]
    assert exported["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_attention_levels_have_ldms_names_and_load_from_an_ldm_file(tmp_path):
    """LDM's kl-f32-style levels: encoder.down.{i}.attn.{j} and decoder.up.{levels - 1 - i}.attn.{j} (norm, q, k, v,
    proj_out; the matrices [C, C, 1, 1]), as LDM's model.py names them (diffusers' own converter skips them)."""
    ref, config = diffusers_reference("attention-levels")
    ldm = ldm_state_dict(ref.state_dict(), 3)
    assert "encoder.down.2.attn.0.q.weight" in ldm and "decoder.up.2.attn.1.proj_out.weight" in ldm
    assert not any(k.startswith(("encoder.down.0.attn", "decoder.up.0.attn")) for k in ldm)
    ours = kl.AutoencoderKL(**kl.read_config(write_json(tmp_path / "config.json", config))).double()
    exported = kl.to_ldm(ours.state_dict(), ours.config)
    assert exported.keys() == ldm.keys() and all(exported[k].shape == v.shape for k, v in ldm.items())
    kl.save_safetensors({"first_stage_model." + k: v for k, v in ldm.items()}, str(tmp_path / "vae.safetensors"))
    kl.load_weights(ours, kl.read_weights(str(tmp_path / "vae.safetensors")))
    assert_same_model(ours, ref)


def test_ldm_export_loads_in_diffusers_from_single_file_and_back_here(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ref, config = diffusers_reference("flux-like")
    ours = kl.AutoencoderKL(**kl.read_config(write_json(tmp_path / "cfg" / "config.json", config)))
    kl.load_weights(ours, ref.state_dict())  # float32 weights, as files have them
    kl.export(ours, str(tmp_path / "vae_ldm.safetensors"), fmt="ldm")
    assert "decoder.up.0.block.0.conv1.weight" in kl.load_safetensors(str(tmp_path / "vae_ldm.safetensors"))
    theirs = diffusers.AutoencoderKL.from_single_file(str(tmp_path / "vae_ldm.safetensors"), config=str(tmp_path / "cfg"),
                                                      local_files_only=True)
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert_same_model(copy.deepcopy(ours), theirs.double().eval())
    again = kl.AutoencoderKL(**kl.read_config(str(tmp_path / "cfg")))
    kl.load_weights(again, kl.read_weights(str(tmp_path / "vae_ldm.safetensors")))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_optional_quant_convs_and_read_config(tmp_path):
    model = kl.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False)
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in model.state_dict())
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    config = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 64], "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "latent_channels": 4, "sample_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert kl.AutoencoderKL(**kl.read_config(str(tmp_path))).encode(torch.zeros(1, 3, 16, 16)).mean.shape == (1, 4, 8, 8)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode())  # as some Windows editors save
    assert kl.read_config(str(tmp_path / "bom.json")) == kl.read_config(str(tmp_path))
    for bad, words in [({"act_fn": "tanh"}, "act_fn"), ({"attention_head_dim": 8}, "unknown AutoencoderKL fields attention_head_dim"),
                       ({"down_block_types": ["DownBlock2D"] * 2}, "down_block_types"), ({"_class_name": "UNet2DModel"}, "UNet2DModel"),
                       ({"up_block_types": ["AttnUpDecoderBlock2D"]}, "up_block_types .* per level"),  # 1 name, 2 levels
                       ({"down_block_types": ["AttnDownEncoderBlock2D"] * 3}, "down_block_types .* per level"),
                       ({"down_block_types": ["DownEncoderBlock2D"]}, "down_block_types .* per level")]:  # plain too
        (tmp_path / "bad.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(kl.UserError, match=words):
            kl.read_config(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("name", list(SD_CONFIGS))
def test_any_diffusers_config_builds_the_same_model_and_survives_export(tmp_path, name):
    diffusers = pytest.importorskip("diffusers")
    ref, config = diffusers_reference(name)
    ours = kl.AutoencoderKL(**kl.read_config(write_json(tmp_path / "in" / "config.json", {**config, "_diffusers_version": "0.42.1"})))
    assert list(ours.state_dict()) == list(ref.state_dict())
    kl.load_weights(ours.double(), ref.state_dict())
    assert_same_model(ours, ref)
    kl.export(ours.float(), str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    reloaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "out"))
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "mid_block_add_attention",
                "act_fn", "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "sample_size", "down_block_types",
                "up_block_types"):
        assert reloaded.config[key] == ref.config[key] or list(reloaded.config[key]) == list(ref.config[key]), key
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_a_diffusers_folder_brings_its_own_config(tmp_path, capsys):
    torch.manual_seed(0)
    model = kl.AutoencoderKL(**kl.complete({**SD_CONFIGS["flux-like"], "block_out_channels": (32, 64)}))
    kl.export(model, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    write_test_image(tmp_path / "in.png", 16, 16)
    kl.main(["reconstruct", "--weights", str(tmp_path / "vae"), "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "o.png"),
             "--device", "cpu"])
    assert "latent [1, 16, 8, 8]" in capsys.readouterr().out  # 16 channels, f = 2: the folder's config, not the sd preset
    kl.main(["reconstruct", "--weights", str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"), "--image",
             str(tmp_path / "in.png"), "--out", str(tmp_path / "o2.png"), "--device", "cpu"])
    assert "latent [1, 16, 8, 8]" in capsys.readouterr().out  # the folder's file: the config.json beside it


def test_a_preset_that_contradicts_the_folders_config_is_refused(tmp_path, capsys):
    """A --weights folder brings its config.json; --preset may name the same model (its tile size aside), not another."""
    model = kl.build("tiny", latent_channels=8, use_quant_conv=False)
    kl.export(model, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    write_test_image(tmp_path / "in.png", 16, 16)
    argv = ["reconstruct", "--weights", str(tmp_path / "vae"), "--image", str(tmp_path / "in.png"), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        kl.main([*argv, "--preset", "tiny", "--out", str(tmp_path / "a.png")])
    assert e.value.code == 2
    kl_error(capsys, "--preset tiny", "config.json", "drop --preset")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**config, "latent_channels": 4, "use_quant_conv": True,
                                                              "sample_size": 64}))
    kl.save_safetensors(kl.build("tiny").state_dict(), str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    kl.main([*argv, "--preset", "tiny", "--out", str(tmp_path / "b.png")])  # the same model, another tile size: fine
    assert os.path.isfile(tmp_path / "b.png")


def test_presets_carry_the_published_latent_conventions():
    with torch.device("meta"):  # the modules and their config, without allocating weights
        models = {p: kl.build(p) for p in ("sd", "sdxl", "sd3", "flux")}
    assert {p: (m.config["scaling_factor"], m.config["shift_factor"]) for p, m in models.items()} == {
        "sd": (0.18215, None), "sdxl": (0.13025, None), "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
    for p in ("sd3", "flux"):
        model = models[p]
        assert model.quant_conv is None and model.post_quant_conv is None and model.config["latent_channels"] == 16
    assert models["sdxl"].config["force_upcast"] and models["sdxl"].config["sample_size"] == 1024


@pytest.mark.parametrize("name", list(SD_CONFIGS))
def test_diffusion_latents_follow_diffusers_pipelines(name):
    config = kl.complete(SD_CONFIGS[name])
    z = torch.randn(3, config["latent_channels"], 4, 5, dtype=torch.float64)
    model_z = kl.to_diffusion_latents(z, config)
    # what diffusers' pipelines do: SD3/Flux (z - shift) * scale; SDXL with latents_mean/std (z - mean) * scale / std
    if config["latents_mean"] is not None:
        mean, std = (torch.tensor(config[k], dtype=torch.float64).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
        expected = (z - mean) * config["scaling_factor"] / std
    else:
        expected = (z - (config["shift_factor"] or 0)) * config["scaling_factor"]
    assert torch.allclose(model_z, expected, rtol=1e-14, atol=0)
    assert torch.allclose(kl.from_diffusion_latents(model_z, config), z, rtol=1e-13, atol=1e-14)


FLUX2_CONFIG = {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [32, 64], "decoder_block_out_channels": [32, 32],
                "layers_per_block": 1, "latent_channels": 8, "sample_size": 32, "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2}  # a FLUX.2-like VAE with a small decoder, small enough for the CPU


def flux2_reference():
    """diffusers' AutoencoderKLFlux2 of FLUX2_CONFIG in float64, its 1-d parameters and bn's statistics drawn."""
    diffusers = pytest.importorskip("diffusers", minversion="0.38")  # AutoencoderKLFlux2 with decoder_block_out_channels
    torch.manual_seed(0)
    ref = with_drawn_vectors(diffusers.AutoencoderKLFlux2.from_config(FLUX2_CONFIG).double().eval())
    with torch.no_grad():
        ref.bn.running_mean.normal_()
        ref.bn.running_var.uniform_(0.2, 3.0)
    return ref


def test_flux2_configs_build_diffusers_model_key_for_key_and_survive_export(tmp_path):
    """An AutoencoderKLFlux2 config.json builds diffusers' model: the same state dict (bn's statistics, the narrower
    decoder), the same posterior and decoding in float64; exported, diffusers loads it as AutoencoderKLFlux2 and we read
    the same config back. An AutoencoderKL config that names FLUX.2's fields is refused, as are bad values of them."""
    diffusers = pytest.importorskip("diffusers", minversion="0.38")
    ref = flux2_reference()
    ours = kl.AutoencoderKL(**kl.read_config(write_json(tmp_path / "in" / "config.json", FLUX2_CONFIG))).double()
    assert list(ours.state_dict()) == list(ref.state_dict()) and ours.decoder.conv_out.weight.shape[1] == 32
    kl.load_weights(ours, ref.state_dict())
    assert_same_model(ours, ref)
    kl.export(ours.float(), str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    reloaded = diffusers.AutoencoderKLFlux2.from_pretrained(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert kl.complete(kl.read_config(str(tmp_path / "out"))) == ours.config
    ldm = kl.to_ldm(ours.state_dict(), ours.config)  # LDM's names: bn's keep theirs
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "decoder.up.1.block.0.conv1.weight"} <= ldm.keys()
    assert all(torch.equal(t, ours.state_dict()[k]) for k, t in kl.fit_weights(ldm, ours.config).items())
    for bad, words in [({"_class_name": "AutoencoderKL"}, "unknown AutoencoderKL fields batch_norm_eps, decoder_block_out"),
                       ({"decoder_block_out_channels": [32]}, "decoder_block_out_channels .* per level"),
                       ({"decoder_block_out_channels": [32, 48]}, "decoder_block_out_channels .* multiple"),
                       ({"batch_norm_eps": 0}, "batch_norm_eps"), ({"batch_norm_eps": None}, "batch_norm_eps .* > 0$"),
                       ({"patch_size": [2]}, "patch_size"), ({"patch_size": [17, 2]}, "patch_size .* up to 16")]:
        with pytest.raises(kl.UserError, match=words):
            kl.read_config(write_json(tmp_path / "bad.json", {**FLUX2_CONFIG, "batch_norm_eps": 1e-4, **bad}))
    with pytest.raises(kl.UserError, match="decoder_block_out_channels .* with batch_norm_eps"):  # diffusers' AutoencoderKL
        kl.check_config({"block_out_channels": (32, 64), "decoder_block_out_channels": (32, 32)}, "keywords")  # has none


def test_the_flux2_preset_is_autoencoderklflux2s_published_config(tmp_path):
    """FLUX.2's config is diffusers' AutoencoderKLFlux2 defaults (32 latent channels, quant convs, bn over 128)."""
    diffusers = pytest.importorskip("diffusers", minversion="0.38")
    with torch.device("meta"):
        theirs, ours = diffusers.AutoencoderKLFlux2(), kl.build("flux2")
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert {k: v for k, v in kl.diffusers_config(ours.config).items() if k != "_class_name"} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.config.items() if not k.startswith("_")}
    assert ours.bn.eps == 1e-4 and ours.bn.num_features == 128 and ours.quant_conv is not None
    # a config.json that names the class and nothing else: AutoencoderKLFlux2's defaults, the preset
    assert kl.complete(kl.read_config(write_json(tmp_path / "c.json", {"_class_name": "AutoencoderKLFlux2"}))) == ours.config
    config = {**ours.config, "block_out_channels": (32, 64), "patch_size": (2, 3)}  # f = 2: image sides of 2 lcm(2, 3)
    kl.check_resolution(24, config, latents=True)
    with pytest.raises(kl.UserError, match="not a multiple of 12"):
        kl.check_resolution(18, config, latents=True)


def test_flux2_latents_follow_diffusers_flux2_pipeline():
    """FLUX.2's diffusion latents as diffusers' Flux2Pipeline makes them (_encode_vae_image: the mode patchified 2x2,
    then standardised by bn's running statistics) and takes them back (before vae.decode), exactly in float64."""
    diffusers = pytest.importorskip("diffusers", minversion="0.38")
    # the pipeline's lines, written out here (importing it needs transformers); the file is checked to hold them
    with open(os.path.join(os.path.dirname(diffusers.__file__), "pipelines", "flux2", "pipeline_flux2.py")) as f:
        source = f.read()
    for line in ("latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)",
                 "latents.permute(0, 1, 3, 5, 2, 4)", "latents.permute(0, 1, 4, 2, 5, 3)",
                 "image_latents = (image_latents - latents_bn_mean) / latents_bn_std",
                 "latents = latents * latents_bn_std + latents_bn_mean",
                 "torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)"):
        assert line in source, line
    bn = flux2_reference().bn
    z = torch.randn(3, 8, 6, 10, dtype=torch.float64)
    b, c, h, w = z.shape
    mean, std = bn.running_mean.view(1, -1, 1, 1), torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4)
    expected = (z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2) - mean) / std
    model_z = kl.to_diffusion_latents(z, kl.complete(kl.PRESETS["flux2"]), bn)
    assert model_z.shape == (3, 32, 3, 5) and torch.equal(model_z, expected)
    back = kl.from_diffusion_latents(model_z, kl.complete(kl.PRESETS["flux2"]), bn)
    theirs = (model_z * std + mean).reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
    assert torch.equal(back, theirs) and torch.allclose(back, z, rtol=0, atol=1e-14)


def test_flux2_encode_and_decode_commands_round_trip(tiny_weights, tmp_path, capsys):
    """encode writes FLUX.2's diffusion latents (patchified: 4 C channels at half the latent size); decode takes them
    back to the images reconstruct makes; an image side that the patches do not divide, and FLUX.2 latents given to
    another model, are one line each."""
    torch.manual_seed(0)
    model = kl.AutoencoderKL(**kl.read_config(write_json(tmp_path / "c.json", {**FLUX2_CONFIG, "batch_norm_eps": 1e-4})))
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.2, 3.0)
    kl.export(model, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "images").mkdir()
    write_test_image(tmp_path / "images" / "a.png", 32, 32)
    common = ["--weights", str(tmp_path / "vae"), "--device", "cpu"]
    kl.main(["encode", *common, "--data", str(tmp_path / "images"), "--out", str(tmp_path / "lat.safetensors")])
    saved = kl.load_safetensors(str(tmp_path / "lat.safetensors"))
    assert saved["latents"].shape == (1, 32, 8, 8) and saved["mean"].shape == (1, 8, 16, 16)
    assert torch.allclose(saved["latents"], kl.to_diffusion_latents(saved["mean"], model.config, model.bn), atol=1e-6)
    assert torch.equal(saved["bn.running_var"], model.bn.running_var)  # the statistics it was standardised with
    kl.main(["decode", *common, "--latents", str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "dec")])
    kl.main(["reconstruct", *common, "--image", str(tmp_path / "images" / "a.png"), "--out", str(tmp_path / "rec.png")])
    decoded = torchvision.io.read_image(str(tmp_path / "dec" / "a.png")).int()
    assert (decoded - torchvision.io.read_image(str(tmp_path / "rec.png")).int()).abs().max() <= 1
    with pytest.raises(SystemExit) as e:
        kl.main(["encode", *common, "--data", str(tmp_path / "images"), "--resolution", "30", "--out", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2
    kl_error(capsys, "--resolution 30", "multiple of 4", "patch size 2")
    with pytest.raises(SystemExit) as e:
        kl.main(["decode", "--weights", tiny_weights, "--preset", "tiny", "--device", "cpu", "--latents",
                 str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "sd")])
    assert e.value.code == 2
    kl_error(capsys, "latents have 32 channels", "this model's 4")
    # decoded by a model with other statistics (a fine-tune): the file's statistics take the latents back
    state = kl.load_safetensors(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    kl.save_safetensors({**state, "bn.running_mean": state["bn.running_mean"] + 1}, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    kl.main(["decode", *common, "--latents", str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "dec2")])
    assert torch.equal(torchvision.io.read_image(str(tmp_path / "dec2" / "a.png")).int(), decoded)
    kl.save_safetensors({**state, "bn.running_var": -state["bn.running_var"]}, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    kl.save_safetensors({**saved, "bn.running_var": saved["bn.running_var"][:5]}, str(tmp_path / "bad.safetensors"))
    kl.save_safetensors({**saved, "bn.running_var": -saved["bn.running_var"]}, str(tmp_path / "neg.safetensors"))
    for argv, words in [(["decode", *common, "--latents", str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "d3")],
                         ("bn.running_var", "negative")),
                        (["decode", *common, "--latents", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "d4")],
                         ("bad.safetensors", "one finite number per latent channel")),
                        (["decode", *common, "--latents", str(tmp_path / "neg.safetensors"), "--out", str(tmp_path / "d5")],
                         ("neg.safetensors", "variances >= 0"))]:
        with pytest.raises(SystemExit) as e:
            kl.main(argv)
        assert e.value.code == 2
        kl_error(capsys, *words)


@pytest.mark.parametrize("h, w", [(80, 56), (96, 96), (40, 40), (32, 24)])
def test_tiled_encode_and_decode_equal_diffusers_tiling(h, w):
    ref, _ = diffusers_reference("sd-like", sample_size=32)
    ours = kl.AutoencoderKL(**kl.complete({**SD_CONFIGS["sd-like"], "sample_size": 32})).double().eval()
    kl.load_weights(ours, ref.state_dict())
    ref.enable_tiling()
    ref.enable_slicing()  # one image at a time, which must change nothing
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, h, w, dtype=torch.float64, generator=g) * 2 - 1
    z = torch.randn(2, 4, h // 4, w // 4, dtype=torch.float64, generator=g)
    with torch.no_grad():
        posterior, theirs = kl.tiled_encode(ours, x), ref.encode(x).latent_dist
        decoded = kl.tiled_decode(ours, z)
        assert relative_error(posterior.mean, theirs.mean) <= 1e-12 and relative_error(posterior.logvar, theirs.logvar) <= 1e-12
        assert relative_error(decoded, ref.decode(z).sample) <= 1e-12
        # and the tiles are real: whole-image encoding and decoding differ from them, except for images that fit one tile
        if max(h, w) > 32:
            assert relative_error(ours.encode(x).mean, posterior.mean) > 1e-3
            assert relative_error(ours.decode(z), decoded) > 1e-3
        else:
            assert torch.equal(ours.encode(x).mean, posterior.mean) and torch.equal(ours.decode(z), decoded)


def test_reconstruct_end_to_end(tiny_weights, tmp_path, capsys):
    write_test_image(tmp_path / "in.png", 24, 32)
    quality = kl.main(["reconstruct", "--weights", tiny_weights, "--preset", "tiny", "--image", str(tmp_path / "in.png"),
                       "--out", str(tmp_path / "out.png"), "--device", "cpu"])
    out = torchvision.io.read_image(str(tmp_path / "out.png"))
    assert out.shape == (3, 24, 32) and out.dtype == torch.uint8
    printed = capsys.readouterr().out
    assert "latent [1, 4, 12, 16]" in printed and "PSNR" in printed
    # the printed PSNR is that of the written file against the input
    x = torchvision.io.read_image(str(tmp_path / "in.png")).float() / 255
    expected = 10 * math.log10(1 / (out.float() / 255 - x).pow(2).mean().item())
    assert quality == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("tile, limit, size, tiled", [("on", None, 16, True), ("off", 1, 16, False), ("auto", 1000, 16, True),
                                                     ("auto", 5000, 16, False), ("on", None, 48, False)])  # 48: one tile
def test_reconstruct_tiles_when_asked_or_above_the_auto_size(tiny_weights, tmp_path, capsys, monkeypatch, tile, limit, size, tiled):
    if limit is not None:
        monkeypatch.setattr(kl, "AUTO_TILE_PIXELS", limit)
    write_test_image(tmp_path / "in.png", 48, 40)  # 1,920 pixels, tiles of size x size
    config = write_json(tmp_path / "cfg" / "config.json", {**kl.PRESETS["tiny"], "sample_size": size})
    kl.main(["reconstruct", "--weights", tiny_weights, "--config", config, "--image", str(tmp_path / "in.png"),
             "--out", str(tmp_path / "out.png"), "--device", "cpu", "--tile", tile])
    assert (", tiled" in capsys.readouterr().out) == tiled
    model = kl.AutoencoderKL(**kl.read_config(config)).eval()
    kl.load_weights(model, kl.load_safetensors(tiny_weights))
    with torch.no_grad():
        x = kl.decode_image(str(tmp_path / "in.png"))[None].float() / 127.5 - 1
        expected = kl.to_uint8((kl.tiled_decode if tiled else kl.AutoencoderKL.decode)(
            model, (kl.tiled_encode if tiled else kl.AutoencoderKL.encode)(model, x).mode())[0])
    assert (torchvision.io.read_image(str(tmp_path / "out.png")).int() - expected.int()).abs().max() <= 1


def test_reconstruct_overwrites_only_when_asked(tiny_weights, tmp_path):
    write_test_image(tmp_path / "in.png", 32, 32)
    (tmp_path / "out.jpg").write_bytes(b"old")
    kl.main(["reconstruct", "--weights", tiny_weights, "--preset", "tiny", "--image", str(tmp_path / "in.png"),
             "--out", str(tmp_path / "out.jpg"), "--device", "cpu", "--overwrite"])
    assert torchvision.io.read_image(str(tmp_path / "out.jpg")).shape == (3, 32, 32)  # a JPEG now
    assert sorted(os.listdir(tmp_path)) == ["in.png", "out.jpg"]


def test_encode_and_decode_commands_round_trip(tiny_weights, tmp_path, capsys):
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        torchvision.io.write_png(torch.from_numpy(smooth_images(1, 32, seed=i)[0]).permute(2, 0, 1).contiguous(), str(folder / f"{i}.png"))
    common = ["--weights", tiny_weights, "--preset", "tiny", "--device", "cpu"]
    kl.main(["encode", *common, "--data", str(tmp_path / "images"), "--resolution", "32", "--batch-size", "2", "--out", str(tmp_path / "lat.safetensors")])
    saved, meta = kl.load_safetensors(str(tmp_path / "lat.safetensors"), metadata=True)
    assert json.loads(meta["names"]) == [os.path.join("sub", f"{i}.png") for i in range(3)]
    model = kl.build("tiny").eval()
    kl.load_weights(model, kl.load_safetensors(tiny_weights))
    x = torch.stack([kl.decode_image(str(folder / f"{i}.png")).float() / 127.5 - 1 for i in range(3)])
    with torch.no_grad():
        posterior = model.encode(x)
    assert torch.allclose(saved["mean"], posterior.mean, atol=1e-5) and torch.allclose(saved["logvar"], posterior.logvar, atol=1e-5)
    assert torch.allclose(saved["latents"], posterior.mean * 0.18215, atol=1e-5)  # tiny keeps SD's scaling factor
    kl.main(["decode", *common, "--latents", str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "decoded")])
    for i in range(3):
        kl.main(["reconstruct", *common, "--image", str(folder / f"{i}.png"), "--out", str(tmp_path / f"rec{i}.png")])
        decoded = torchvision.io.read_image(str(tmp_path / "decoded" / "sub" / f"{i}.png")).int()
        assert (decoded - torchvision.io.read_image(str(tmp_path / f"rec{i}.png")).int()).abs().max() <= 1
    # --sample: another z, the same posterior
    kl.main(["encode", *common, "--data", str(tmp_path / "images"), "--resolution", "32", "--sample", "--out", str(tmp_path / "s.safetensors")])
    sampled = kl.load_safetensors(str(tmp_path / "s.safetensors"))
    assert torch.allclose(sampled["mean"], saved["mean"], atol=1e-6)
    eps = torch.randn(saved["mean"].shape, generator=torch.Generator().manual_seed(0))  # --seed 0, one batch of 3
    z = saved["mean"] + torch.exp(0.5 * saved["logvar"]) * eps
    assert torch.allclose(sampled["latents"], z * 0.18215, atol=1e-5) and not torch.allclose(z, saved["mean"], atol=0.1)


def test_fp16_is_upcast_where_the_config_says_so(tiny_weights, tmp_path, capsys):
    write_test_image(tmp_path / "in.png", 16, 16)
    args = ["reconstruct", "--weights", tiny_weights, "--image", str(tmp_path / "in.png"), "--device", "cpu"]
    upcast = write_json(tmp_path / "up" / "config.json", {**kl.PRESETS["tiny"], "force_upcast": True})
    assert kl.main([*args, "--config", upcast, "--dtype", "fp16", "--out", str(tmp_path / "a.png")]) == \
        kl.main([*args, "--config", upcast, "--dtype", "fp32", "--out", str(tmp_path / "b.png")])
    assert "force_upcast" in capsys.readouterr().err
    plain = write_json(tmp_path / "plain" / "config.json", {**kl.PRESETS["tiny"], "force_upcast": False})
    kl.main([*args, "--config", plain, "--dtype", "fp16", "--out", str(tmp_path / "c.png")])
    assert "float16" in capsys.readouterr().out


def test_compile_compiles_the_encoder_and_the_decoder_themselves(tiny_weights, tmp_path, monkeypatch):
    """--compile in reconstruct, encode and decode compiles model.encoder and model.decoder, which encode() and decode()
    call (compiling forward would leave them eager), and nothing without it. (A real compile on this CPU takes 27 s
    for the tiny model; measured once: outputs within 7.7e-6 of eager, of values up to 1.8.)"""
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    (tmp_path / "imgs").mkdir()
    write_test_image(tmp_path / "imgs" / "in.png", 16, 16)
    common = ["--weights", tiny_weights, "--preset", "tiny", "--device", "cpu"]
    lat = str(tmp_path / "lat.safetensors")
    for flags in ([], ["--compile"]):
        kl.main(["reconstruct", *common, "--image", str(tmp_path / "imgs" / "in.png"), "--out", str(tmp_path / "r.png"),
                 "--overwrite", *flags])
        kl.main(["encode", *common, "--data", str(tmp_path / "imgs"), "--resolution", "16", "--out", lat, "--overwrite",
                 *flags])
        kl.main(["decode", *common, "--latents", lat, "--out", str(tmp_path / "d"), "--overwrite", *flags])
        assert compiled == ["Encoder", "Decoder"] * 3 * bool(flags), compiled


def compile_failure():
    """What torch.compile raises at the first call where inductor has no working C++ compiler (as measured here with
    CXX=/nonexistent/g++): BackendCompilerFailed around InvalidCxxCompiler (its constructor's arguments by torch version)."""
    inner = type("InvalidCxxCompiler", (RuntimeError,), {})("No working C++ compiler found in torch._inductor.config.cpp.cxx")
    n = len(inspect.signature(torch._dynamo.exc.BackendCompilerFailed.__init__).parameters)
    return torch._dynamo.exc.BackendCompilerFailed(lambda: None, inner, *[None] * (n - 3))


def test_a_compile_that_cannot_work_is_one_line(data_dir, tiny_weights, tmp_path, monkeypatch, capsys):
    """--compile on a machine where torch.compile cannot work (no C++ compiler) ends with one line that says so and how
    to go on, exit 2, in both programs: not inductor's traceback."""
    def failing(*args, **kwargs):
        raise compile_failure()
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: failing)  # vae.py compiles its step's terms
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: setattr(self, "forward", failing))
    write_test_image(tmp_path / "in.png", 16, 16)
    for program, argv in [(vae, ["--data-dir", data_dir, "--out", str(tmp_path / "v"), *TINY, "--epochs", "1", "--compile"]),
                          (kl, ["reconstruct", "--weights", tiny_weights, "--preset", "tiny", "--device", "cpu", "--image",
                                str(tmp_path / "in.png"), "--out", str(tmp_path / "r.png"), "--compile"])]:
        with pytest.raises(SystemExit) as e:
            program.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert "--compile: torch.compile failed (InvalidCxxCompiler: No working C++ compiler" in err, err
        assert err.endswith("run without --compile"), err


def test_a_float16_run_that_overflows_runs_again_in_float32(tiny_weights, tmp_path, capsys):
    """conv_in's weights x 1e6 in the encoder and the decoder: activations finite in float32 and beyond float16's
    65,504 (the GroupNorms after them take them back). With force_upcast false, --dtype fp16 in reconstruct, encode
    and decode says so in one line and writes what --dtype fp32 writes, not black images or NaN latents."""
    state = kl.load_safetensors(tiny_weights)
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight"):
        state[key] = state[key] * 1e6
    kl.save_safetensors(state, str(tmp_path / "big.safetensors"))
    (tmp_path / "imgs").mkdir()
    write_test_image(tmp_path / "imgs" / "in.png", 16, 16)
    plain = write_json(tmp_path / "plain" / "config.json", {**kl.PRESETS["tiny"], "force_upcast": False})
    common = ["--weights", str(tmp_path / "big.safetensors"), "--config", plain, "--device", "cpu"]
    for dtype in ("fp32", "fp16"):
        kl.main(["reconstruct", *common, "--image", str(tmp_path / "imgs" / "in.png"), "--dtype", dtype,
                 "--out", str(tmp_path / f"rec_{dtype}.png")])
        kl.main(["encode", *common, "--data", str(tmp_path / "imgs"), "--resolution", "16", "--dtype", dtype,
                 "--out", str(tmp_path / f"lat_{dtype}.safetensors")])
        kl.main(["decode", *common, "--latents", str(tmp_path / "lat_fp32.safetensors"), "--dtype", dtype,
                 "--out", str(tmp_path / f"dec_{dtype}")])
        notes = capsys.readouterr().err
        assert notes.count("overflowed in float16") == (3 if dtype == "fp16" else 0), notes
    assert (tmp_path / "rec_fp16.png").read_bytes() == (tmp_path / "rec_fp32.png").read_bytes()
    assert (tmp_path / "dec_fp16" / "in.png").read_bytes() == (tmp_path / "dec_fp32" / "in.png").read_bytes()
    latents = [kl.load_safetensors(str(tmp_path / f"lat_{d}.safetensors"))["latents"] for d in ("fp16", "fp32")]
    assert torch.equal(*latents) and torch.isfinite(latents[0]).all()
    state = kl.load_safetensors(tiny_weights)  # only the log-variances overflow: the mean (what encode writes) is
    for key in ("quant_conv.weight", "quant_conv.bias"):  # finite in float16, and so is the clamped logvar
        state[key][4:] *= 1e6
    kl.save_safetensors(state, str(tmp_path / "wide.safetensors"))
    for dtype in ("fp32", "fp16"):
        kl.main(["encode", *common[2:], "--weights", str(tmp_path / "wide.safetensors"), "--data", str(tmp_path / "imgs"),
                 "--resolution", "16", "--dtype", dtype, "--out", str(tmp_path / f"wide_{dtype}.safetensors")])
        assert capsys.readouterr().err.count("overflowed in float16") == (dtype == "fp16")  # the moments are checked
    assert torch.equal(*[kl.load_safetensors(str(tmp_path / f"wide_{d}.safetensors"))["latents"] for d in ("fp16", "fp32")])


@pytest.mark.parametrize("names, written", [(["../escaped.png", "a.png"], ["000000.png", "000001.png"]),  # not outside
                                             (["a/x.png", "b/x.png"], ["a/x.png", "b/x.png"]),
                                             (["c.png", "c.jpg"], ["000000.png", "000001.png"]),  # not c.png twice
                                             (["c.png", "C.png"], ["000000.png", "000001.png"]),  # (on macOS: one file)
                                             (["c.png"], ["000000.png", "000001.png"]),  # not one per image
                                             (["a\0b.png", "x" * 300 + ".png"], ["000000.png", "000001.png"]),
                                             (["\udcff.png", "b.png"], ["b.png", "\udcff.png"])])  # not UTF-8
def test_decode_writes_one_image_per_latent_and_only_inside_its_out_folder(names, written, tiny_weights, tmp_path):
    path = str(tmp_path / "lat.safetensors")
    kl.save_safetensors({"latents": torch.zeros(max(2, len(names)), 4, 4, 4)}, path, metadata={"names": json.dumps(names)})
    kl.main(["decode", "--weights", tiny_weights, "--preset", "tiny", "--device", "cpu", "--latents", path, "--out", str(tmp_path / "out")])
    assert sorted(os.path.relpath(os.path.join(d, f), tmp_path / "out") for d, _, files in os.walk(tmp_path / "out")
                  for f in files) == written and not (tmp_path / "escaped.png").exists()


def test_train_from_ldm_weights_and_eval_weights_files(kl_data, tmp_path, capsys):
    torch.manual_seed(3)
    start = kl.build("tiny").state_dict()
    ldm = str(tmp_path / "start.ckpt")
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in ldm_state_dict(start, 2).items()}}, ldm)
    kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "1", "--lr", "1e-12", "--disc-weight", "0", "--weights", ldm,
             "--out", str(tmp_path / "run")])
    trained = torch.load(str(tmp_path / "run" / "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.allclose(trained[k], v, atol=1e-8) for k, v in start.items())
    record = kl.main(["eval", "--weights", ldm, "--preset", "tiny", "--data", kl_data, "--val-size", "16", "--resolution", "32",
                      "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert record["images"] == 16 and os.path.exists(tmp_path / "ev" / "metrics.jsonl")
    kl.main(["eval", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--export", str(tmp_path / "ev" / "ldm.safetensors"),
             "--export-format", "ldm"])
    assert "decoder.up.0.block.0.conv1.weight" in kl.load_safetensors(str(tmp_path / "ev" / "ldm.safetensors"))
    # convert: the LDM .ckpt to diffusers' format, which holds the same weights
    kl.main(["convert", "--weights", ldm, "--preset", "tiny", "--device", "cpu",  # as every other command takes it
             "--export", str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")])
    converted = kl.load_safetensors(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert converted.keys() == start.keys() and all(torch.equal(converted[k], v) for k, v in start.items())
    assert kl.read_config(str(tmp_path / "vae"))["block_out_channels"] == (32, 64)


# ============================================================================= both programs

# ----------------------------------------------------------------------------- user mistakes: one line on stderr, exit code 2, nothing written

@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir, kl_data, tiny_weights, trained):
    """A folder of the files the table of user mistakes names ({d}/name), with a vae.py run ({vaerun}) and a
    kl_autoencoder.py run ({d}/klrun) in it, a diffusers folder ({d}/wfolder), a folder another process holds locked
    as a run does ({d}/locked), and MNIST and an .npz of images beside it ({mnist}, {kldata})."""
    d = tmp_path_factory.mktemp("inputs")
    for name, (h, w) in {"in32.png": (32, 32), "in31x32.png": (31, 32), "in1.png": (1, 1)}.items():
        write_test_image(d / name, h, w)
    (d / "text.png").write_bytes(b"this is text")
    (d / "existing.png").write_bytes(b"someone's picture")
    for folder in ("folder.png", "weightless", "dir", "no_mnist", "imgs"):
        (d / folder).mkdir()
    write_test_image(d / "imgs" / "a.png", 32, 32)
    shutil.copy(tiny_weights, d / "tiny.safetensors")
    state = kl.load_safetensors(tiny_weights)
    kl.save_safetensors({k: v for k, v in state.items() if k != "decoder.conv_out.weight"}, str(d / "partial.safetensors"))
    kl.save_safetensors({**state, "decoder.conv_out.weight": state["decoder.conv_out.weight"] * float("nan")},
                        str(d / "nan.safetensors"))
    torch.save({"state_dict": state, "callbacks": RunsCode(str(d / "ran"))}, str(d / "evil.ckpt"))  # would make {d}/ran
    (d / "text.ckpt").write_text("hello")
    for name, latents in (("nolat", {"other": torch.zeros(1)}), ("lat16", {"latents": torch.zeros(1, 16, 4, 4)}),
                          ("lat", {"latents": torch.zeros(1, 4, 4, 4)}), ("lat0h", {"latents": torch.zeros(2, 4, 0, 4)}),
                          ("lat0n", {"latents": torch.zeros(0, 4, 4, 4)})):
        kl.save_safetensors(latents, str(d / f"{name}.safetensors"))
    (d / "decoded").mkdir()
    (d / "decoded" / "000000.png").write_bytes(b"mine")
    (d / "bad.npz").write_bytes(b"not a zip file, and not a pickle either")
    (d / "broken").mkdir()
    for i in range(20):
        torchvision.io.write_png(torch.full((3, 32, 32), 10 * i, dtype=torch.uint8), str(d / "broken" / f"{i:02d}.png"))
    (d / "broken" / "13.png").write_bytes(b"\x89PNG broken")
    (d / "text_ckpt.pt").write_text("hello, I am a text file\n" * 10)
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all")
    ckpt = torch.load(os.path.join(trained[0], "ckpt.pt"), weights_only=True)  # vae.py checkpoints of other versions:
    torch.save({**ckpt, "config": {k: v for k, v in ckpt["config"].items() if k != "likelihood"}}, d / "vae_nokey.pt")
    torch.save({**ckpt, "config": {**ckpt["config"], "hidden": [32]}}, d / "vae_other.pt")  # weights of other sizes
    for damage in ("truncated_gz", "not_gzip", "bad_magic"):
        make_mnist(str(d / damage), gz=damage != "bad_magic")
        raw = d / damage / "MNIST" / "raw"
        blob = bytearray((raw / "train-images-idx3-ubyte.gz").read_bytes() if damage != "bad_magic" else
                         (raw / "train-images-idx3-ubyte").read_bytes())
        if damage == "bad_magic":
            (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x05" + blob[4:])
        else:
            (raw / "train-images-idx3-ubyte.gz").write_bytes(blob[:len(blob) // 2] if damage == "truncated_gz" else
                                                             b"this is not gzip data at all")
    kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "1", "--disc-weight", "0", "--out", str(d / "klrun")])
    (d / "copy").mkdir()
    shutil.copy(d / "klrun" / "ckpt.pt", d / "copy" / "ckpt.pt")
    (d / "evalrun").mkdir()  # a folder with an evaluation's log and nothing else
    shutil.copy(d / "klrun" / "metrics.jsonl", d / "evalrun" / "metrics.jsonl")
    (d / "runs").mkdir()  # a run's files, and checkpoints of other runs copied in beside them
    for name in ("metrics.jsonl", "samples.png", "reconstructions.png"):
        shutil.copy(os.path.join(trained[0], name) if name != "reconstructions.png" else d / "klrun" / name, d / "runs")
    shutil.copy(d / "klrun" / "ckpt.pt", d / "runs" / "kl_copy.pt")
    shutil.copy(os.path.join(trained[0], "ckpt.pt"), d / "runs" / "vae_copy.pt")
    for name, text in (("badcfg", "not json {"), ("othercfg", json.dumps(kl.diffusers_config(kl.build("small").config)))):
        (d / name).mkdir()
        (d / name / "config.json").write_text(text)
    (d / "moved").mkdir()  # a run whose data is not where it was
    ckpt = torch.load(d / "klrun" / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "data": "images_moved_away.npz"}}, d / "moved" / "ckpt.pt")
    (d / "wide").mkdir()  # one line of 200,000 pixels (a PNG of under 1 kB): resized to 256 high, 160 GB
    torchvision.io.write_png(torch.full((3, 1, 200_000), 128, dtype=torch.uint8), str(d / "wide" / "line.png"))
    kl.main(["convert", "--weights", tiny_weights, "--preset", "tiny", "--export",
             str(d / "wfolder" / "diffusion_pytorch_model.safetensors")])
    config = kl.read_config(str(d / "wfolder"))
    for name, change in BAD_CONFIGS.items():
        (d / f"c_{name}.json").write_text(change if isinstance(change, str) else json.dumps({**config, **change}))
    attention = ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]  # a good config with attention in the first level
    (d / "c_attn.json").write_text(json.dumps({**config, "down_block_types": attention}))
    overflow = {**state, "encoder.conv_in.weight": state["encoder.conv_in.weight"] * 1e38}  # finite, and so large
    kl.save_safetensors(overflow, str(d / "overflow.safetensors"))  # that the activations are not
    one_nan = torch.zeros(1, 4, 4, 4).index_put_((torch.tensor(0),) * 4, torch.tensor(float("nan")))  # one is enough
    for name, latents, meta in (("latnan", one_nan, {}),
                                ("latscale0", torch.zeros(1, 4, 4, 4), {"config": json.dumps({"scaling_factor": 0})}),
                                ("latlist", torch.zeros(1, 4, 4, 4), {"config": "[1, 2]"})):
        kl.save_safetensors({"latents": latents}, str(d / f"{name}.safetensors"), metadata=meta)
    images = smooth_images(8, 16)
    for name, arrays in {"labels3": dict(images=images, labels=np.arange(3)), "labels2d": dict(images=images, labels=
                         np.zeros((8, 2), int)), "labelstr": dict(images=images, labels=np.array(["cat"] * 8)),
                         "empty": dict(images=images[:0]), "zerosize": dict(images=images[:, :0])}.items():
        np.savez(d / f"{name}.npz", **arrays)
    bomb = bytearray((d / "in32.png").read_bytes())
    bomb[16:24] = struct.pack(">II", 10 ** 6, 10 ** 6)  # a PNG that says it is 10^6 x 10^6 pixels (8 TB decoded)
    (d / "bomb.png").write_bytes(bytes(bomb))
    (d / "bmps").mkdir()
    (d / "bmps" / "a.bmp").write_bytes(b"BM" + bytes(60))
    (d / "locked").mkdir()
    locker = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); time.sleep(600)", str(d / "locked")],
                              stdout=subprocess.PIPE)
    locker.stdout.readline()  # it holds the lock
    yield {"d": str(d), "mnist": data_dir, "kldata": kl_data, "vaerun": trained[0]}
    locker.kill()


BAD_CONFIGS = {"str": {"latent_channels": "4"}, "zero": {"latent_channels": 0}, "groups7": {"norm_num_groups": 7},
               "empty": {"block_out_channels": []}, "nullblock": {"down_block_types": None}, "actlist": {"act_fn": ["silu"]},
               "scale0": {"scaling_factor": 0}, "scalenan": {"scaling_factor": float("nan")}, "flag": {"use_quant_conv": 1},
               "mean3": {"latents_mean": [1, 2, 3], "latents_std": [1, 1, 1, 1]}, "deep": "[" * 100_000 + "]" * 100_000,
               "huge": {"block_out_channels": [65536] * 4}, "blockname": {"up_block_types": ["UpBlock2D"] * 2},
               "blocks1": {"down_block_types": ["AttnDownEncoderBlock2D"]}}
VAE = "--data-dir {mnist} --device cpu --out {new} "  # the start of every vae.py command below
R = "reconstruct --device cpu --out {new}.png --image {d}/in32.png "  # and of reconstruct's
W = "--weights {d}/tiny.safetensors --preset tiny --device cpu "  # the tiny model, for encode, decode, convert, eval
T = "train --data {kldata} " + " ".join(KL_TINY) + " --out {new} "  # a tiny training run
MISTAKES = [  # (program, command, words its message must hold, "!word" one it must not): {new} is a fresh path
    ("vae", VAE + "--epochs 0", ["--epochs", "must be > 0"]),
    ("vae", VAE + "--epochs 1.5", ["--epochs", "an integer", "'1.5'"]),
    ("vae", VAE + "--lr -1", ["--lr"]),
    ("vae", VAE + "--lr nan", ["--lr"]),
    ("vae", VAE + "--beta inf", ["--beta"]),
    ("vae", VAE + "--hidden wide", ["--hidden", "'wide'"]),
    ("vae", VAE + "--device tpu", ["--device", "tpu"]),
    ("vae", VAE + f"--seed {2 ** 64}", ["--seed", "at most"]),
    ("vae", VAE + "--seed -1", ["--seed"]),
    ("vae", VAE + "--beta 2 --capacity 5", ["--capacity", "--beta"]),
    ("vae", VAE + "--train-samples 5 --beta 4", ["--train-samples"]),
    ("vae", VAE + "--batch-size 100000", ["--batch-size"]),
    ("vae", VAE + "--eval-only --ckpt nowhere/ckpt.pt", ["nowhere/ckpt.pt"]),
    ("vae", VAE + "--resume", ["no checkpoint"]),
    ("vae", VAE + "--ckpt {d}/dir", ["--ckpt {d}/dir is a folder"]),
    ("vae", VAE + "--ckpt {d}/existing.png/ckpt.pt", ["existing.png"]),  # under a file: before any training
    ("vae", VAE + "--eval-only --ckpt {d}/text_ckpt.pt", ["not a readable checkpoint", "pass a ckpt.pt that vae.py wrote",
                                                          "!101"]),  # (torch.load's KeyError of a text file)
    ("vae", VAE + "--eval-only --ckpt {d}/garbage.pt", ["garbage.pt", "not a readable checkpoint"]),
    ("vae", VAE + "--eval-only --ckpt {d}/vae_nokey.pt", ["vae_nokey.pt", "does not hold a model vae.py can build"]),
    ("vae", VAE + "--eval-only --ckpt {d}/vae_other.pt", ["vae_other.pt", "does not hold a model vae.py can build"]),
    ("vae", VAE + "--out {vaerun} --epochs 1", ["exists", "--resume"]),
    ("vae", VAE + "--out {vaerun} --ckpt {new}/elsewhere.pt --epochs 1", ["metrics.jsonl", "--overwrite"]),
    ("vae", VAE + "--out {vaerun} --hidden 32 --resume --epochs 7", ["--hidden [64]"]),
    ("vae", VAE + "--data-dir {d}/truncated_gz", ["train-images-idx3-ubyte.gz", "gzip"]),
    ("vae", VAE + "--data-dir {d}/not_gzip", ["train-images-idx3-ubyte.gz", "gzip"]),
    ("vae", VAE + "--data-dir {d}/bad_magic", ["magic number"]),
    ("vae", VAE + "--data-dir {d}/no_mnist", [os.path.join("no_mnist", "MNIST", "raw"), "train-images-idx3-ubyte"]),
    ("vae", VAE + "--fid", ["inception_v3_google", "checkpoints"]),  # offline: before training
    ("vae", VAE + "--out {d}/text.png/run", ["Not a directory", "text.png"]),
    ("kl", R + W.replace("tiny.", "nothing."), ["No such file", "nothing.safetensors"]),
    ("kl", R + W + "--image {d}/nothing.png", ["No such file", "nothing.png"]),
    ("kl", R + W + "--image {d}/text.png", ["cannot decode"]),
    ("kl", R + W + "--image {d}/in31x32.png", ["31x32", "multiples of 2", "30x32 or 32x32"]),
    ("kl", R + W + "--image {d}/in1.png", ["1x1", "at least 2"]),
    ("kl", R + W.replace("tiny ", "small "), ["does not fit", "preset small"]),
    ("kl", R + W.replace("tiny ", "sd3 "), ["does not fit", "preset sd3", "--preset or --config"]),
    ("kl", R + W.replace("tiny.", "partial."), ["1 missing", "decoder.conv_out.weight"]),
    ("kl", R + W.replace("tiny.", "nan."), ["decoder.conv_out.weight", "NaN"]),
    ("kl", R + W.replace("tiny.safetensors", "evil.ckpt"), ["evil.ckpt", "open", "refused", ".safetensors"]),
    ("kl", R + W.replace("tiny.safetensors", "text.ckpt"), ["text.ckpt is not a safetensors file or a PyTorch checkpoint"]),
    ("kl", R + W.replace("tiny.safetensors", "weightless"), ["without diffusion_pytorch_model.safetensors"]),
    ("kl", R + W + "--config c.json", ["--config and --preset"]),
    ("kl", R + "--ckpt x.pt --preset tiny", ["--ckpt holds its model's config"]),
    ("kl", R + W + "--ema", ["tiny.safetensors holds no EMA weights", "leave out --ema"]),
    ("kl", R + "--weights {d}/tiny.safetensors --config missing.json", ["No such file", "missing.json"]),
    ("kl", R + W + "--out {d}/tiny.safetensors", ["also an input"]),
    ("kl", R + W + "--out {d}/in32.png", ["also an input"]),
    ("kl", R + W + "--out {d}/existing.png", ["exists", "--overwrite"]),
    ("kl", R + W + "--out {new}.bmp", [".bmp", ".png or .jpg or .jpeg"]),
    ("kl", R + W + "--out {new}/out.png", ["does not exist"]),
    ("kl", R + W + "--out {d}/folder.png", ["is a folder"]),
    ("kl", "encode " + W + "--data {d}/imgs --out {new}.npz", ["is not a .safetensors file"]),
    ("kl", "encode " + W + "--data {d}/imgs --out {d}/lat.safetensors", ["exists", "--overwrite"]),
    ("kl", "encode " + W + "--data {d}/imgs --resolution 31 --out {new}.safetensors", ["multiple of 2"]),
    ("kl", "decode " + W + "--latents {d}/nolat.safetensors --out {new}", ["no 'latents' tensor"]),
    ("kl", "decode " + W + "--latents {d}/lat16.safetensors --out {new}", ["16 channels", "4"]),
    ("kl", "decode " + W + "--latents {d}/lat.safetensors --out {d}/decoded", ["000000.png exists"]),
    ("kl", "decode " + W + "--latents {d}/lat.safetensors --out {d}/tiny.safetensors", ["is a file"]),
    ("kl", "decode " + W + "--latents {d}/none.safetensors --out {new}", ["No such file", "none.safetensors"]),
    ("kl", "convert --weights {d}/tiny.safetensors --preset tiny --export {d}/tiny.safetensors", ["also an input"]),
    ("kl", "eval " + W + "--data x.npz", ["pass --out"]),
    ("kl", "eval --ckpt {d}/klrun/ckpt.pt --device cpu --export {d}/klrun/ckpt.pt", ["also an input"]),
    ("kl", "eval --ckpt {d}/klrun/ckpt.pt --device cpu --export {d}/dir", ["is a folder"]),
    ("kl", "eval --ckpt {d}/klrun/ckpt.pt --device cpu --export {new}.bin", [".safetensors"]),
    ("kl", "eval --ckpt {d}/klrun/ckpt.pt --device cpu --resolution 33", ["multiple of 2"]),
    ("kl", "eval --ckpt {d}/klrun/ckpt.pt --device cpu --resolution 0", ["--resolution"]),
    ("kl", "eval --ckpt {d}/copy/ckpt.pt --device cpu --out {d}/klrun", ["metrics.jsonl", "exists"]),
    ("kl", "eval --ckpt {d}/runs/kl_copy.pt --device cpu", ["runs/metrics.jsonl", "exists"]),  # another run's folder
    ("vae", "--eval-only --ckpt {d}/runs/vae_copy.pt --data-dir {mnist} --device cpu", ["holds another run's"]),
    ("kl", T + "--steps 1 --out {d}/klrun", ["exists", "--resume", "--overwrite"]),
    ("kl", T + "--steps 1 --out {d}/evalrun", ["metrics.jsonl", "exists"]),
    ("kl", T + "--preset small --resolution 30", ["--resolution 30", "multiple of 4", "28 or 32"]),
    ("kl", T + "--resolution 16 --disc-weight 0.5", ["discriminator", "--disc-weight 0"]),
    ("kl", T + "--resolution 100000", ["--resolution 100000", "GiB"]),
    ("kl", T + "--steps 3 --epochs 1", ["--steps and --epochs"]),
    ("kl", T + "--out {d}/text.png/run", ["Not a directory", "text.png"]),
    ("kl", T + "--data nowhere.npz", ["No such file", "nowhere.npz"]),
    ("kl", T + "--data {d}/in32.png", ["in32.png", "not a folder, an .npz file"]),
    ("kl", "train --preset tiny --device cpu --out {new}", ["--data"]),
    ("kl", T + "--data cifar10 --data-root {new}", ["could not get cifar10", "--data-root"]),  # offline
    ("kl", T + "--data {d}/bad.npz", ["bad.npz", "not a readable .npz"]),
    ("kl", T + "--data {d}/broken --workers 1 --val-size 2 --steps 4", ["13.png", "cannot decode"]),
    ("kl", T + "--perceptual-weight 1", ["vgg16", "--perceptual-weight 0"]),  # offline
    ("kl", T + "--grad-clip nan", ["--grad-clip"]),
    ("kl", T + "--eval-every -1", ["--eval-every"]),
    ("kl", T + "--lr nan", ["--lr"]),
    ("kl", T + "--weight-decay nan", ["--weight-decay"]),
    ("kl", T + "--workers -1", ["--workers"]),
    ("kl", T + "--epochs 1.5", ["--epochs", "an integer"]),
    ("kl", T + f"--seed {2 ** 64}", ["--seed", "at most"]),
    ("kl", T + "--block-out-channels 0", ["--block-out-channels"]),
    ("kl", T + "--block-out-channels 33 64", ["multiple of 32"]),
    ("kl", T + "--latent-channels 0", ["--latent-channels"]),
    ("kl", T + "--layers-per-block -1", ["--layers-per-block"]),
    ("kl", T + "--ema 1", ["--ema", "[0, 1)"]),
    ("kl", T + "--betas 0.5 1.5", ["--betas", "[0, 1)"]),
    # data loss: never over an input, however spelled; a resumed run stays in its folder; one run in a folder at a time
    ("kl", "encode --weights {d}/wfolder --device cpu --data {d}/imgs --overwrite "
           "--out {d}/wfolder/diffusion_pytorch_model.safetensors", ["also an input"]),
    ("kl", "convert --weights {d}/wfolder --overwrite --export {d}/wfolder/../wfolder/other.safetensors",
     ["--export's", "config.json", "also an input"]),
    ("kl", T + "--weights {d}/tiny.safetensors --overwrite --export {d}/tiny.safetensors", ["also an input"]),
    ("vae", VAE + "--resume --ckpt {vaerun}/ckpt.pt", ["belongs to the run in {vaerun}", "--out {vaerun}"]),
    ("vae", VAE.replace("{new}", "{d}/locked") + "--epochs 1", ["{d}/locked", "in use by another run"]),
    ("kl", T.replace("{new}", "{d}/locked") + "--steps 1", ["in use by another run"]),
    ("kl", "encode " + W + "--data {d}/imgs --out {d}/locked/lat.safetensors", ["in use by another run"]),
    ("kl", "decode " + W + "--latents {d}/lat.safetensors --out {d}/locked", ["in use by another run"]),
    # garbage: refused, not a flat image and exit 0
    *[("kl", "convert --weights {d}/tiny.safetensors --export {new}.safetensors --config {d}/c_%s.json" % name, words)
      for name, words in {"str": ["latent_channels \"4\"", "positive integer"], "zero": ["latent_channels 0"],
                          "groups7": ["block_out_channels", "multiples of norm_num_groups (7)"],
                          "empty": ["block_out_channels []"], "nullblock": ["down_block_types"],
                          "actlist": ["act_fn", "one of silu"], "scale0": ["scaling_factor 0", "> 0"],
                          "scalenan": ["scaling_factor NaN"], "flag": ["use_quant_conv 1", "true or false"],
                          "mean3": ["latents_mean", "4 finite numbers"], "deep": ["nested too deeply"],
                          "huge": ["parameters", "GiB"], "blockname": ["up_block_types", "AttnUpDecoderBlock2D per level"],
                          "blocks1": ["down_block_types", "per level"]}.items()],
    ("kl", T.replace("--preset tiny ", "") + "--steps 1 --config {d}/c_attn.json --block-out-channels 32 64 64",
     ["--block-out-channels 32 64 64", "down_block_types", "per level"]),  # 3 levels, 2 block types
    # sizes that cannot be allocated: one line that says how much memory, before the allocation
    ("vae", VAE + "--hidden 1000000 1000000", ["--hidden 1000000 1000000", "parameters", "GiB"]),
    ("kl", T + "--block-out-channels 65536 65536 65536", ["--block-out-channels 65536", "parameters", "GiB"]),
    ("kl", R.replace("in32.png", "bomb.png") + W, ["bomb.png", "1000000x1000000", "GiB"]),
    ("kl", "decode " + W + "--latents {d}/latnan.safetensors --out {new}", ["latnan.safetensors", "NaN or infinite"]),
    ("kl", "decode " + W + "--latents {d}/latscale0.safetensors --out {new}", ["metadata", "scaling_factor 0"]),
    ("kl", "decode " + W + "--latents {d}/latlist.safetensors --out {new}", ["metadata", "not a JSON object"]),
    ("kl", R + W.replace("tiny.", "overflow."), ["reconstructed pixels", "NaN or infinite"]),
    ("kl", "encode " + W.replace("tiny.", "overflow.") + "--data {d}/imgs --out {new}.safetensors", ["latents", "NaN"]),
    ("kl", T + "--data {d}/labels3.npz", ["'labels' must be one integer per image, 8", "(3,)"]),
    ("kl", T + "--data {d}/labels2d.npz", ["'labels'", "(8, 2)"]),
    ("kl", T + "--data {d}/labelstr.npz", ["'labels'", "<U3"]),
    ("kl", T + "--data {d}/empty.npz", ["'images'", "none 0", "(0, 16, 16, 3)"]),
    ("kl", T + "--data {d}/zerosize.npz", ["'images'", "(8, 0, 16, 3)"]),
    ("kl", T + "--data {d}/bmps", ["no images", ".webp", "!.bmp"]),
    ("kl", "eval --ckpt {d}/klrun/ckpt.pt --device cpu --resolution 8", ["--resolution 8", "SSIM", "11 x 11"]),
    ("kl", T.replace("--out {new}", "--out {d}/imgs/run") + "--data {d}/imgs", ["inside the image folder"]),
    ("kl", T + "--steps 1 --val-data {kldata}", ["--val-data", "is --data", "held-out images would be the training images"]),
    ("kl", "eval " + W + "--data {d}/imgs --out {d}/imgs", ["--out {d}/imgs is inside the image folder {d}/imgs"]),
    ("kl", "convert " + W + "--export {d}/badcfg/vae.safetensors", ["badcfg/config.json", "another model"]),
    ("kl", "convert " + W + "--export ''", ["--export  is not a .safetensors file"]),
    ("kl", "eval " + W + "--data {d}/missing.npz --out {new}", ["missing.npz", "!trained on"]),
    ("kl", T + "--steps 1 --data cifar10 --val-data cifar10", ["--val-data cifar10 is --data"]),
    ("kl", "eval --ckpt {d}/moved/ckpt.pt --device cpu --out {new}", ["trained on --data", "not there from here"]),
    ("kl", T + "--steps 1 --export {d}/othercfg/vae.safetensors", ["othercfg/config.json", "another model"]),
    ("kl", "decode " + W + "--latents {d}/lat0h.safetensors --out {new}", ["lat0h.safetensors", "none 0"]),
    ("kl", "decode " + W + "--latents {d}/lat0n.safetensors --out {new}", ["lat0n.safetensors", "none 0"]),
    ("kl", "encode " + W + "--data {d}/wide --resolution 256 --out {new}.safetensors", ["1x200000", "GiB"]),
]


@pytest.mark.parametrize("program, command, words", MISTAKES, ids=[f"{p}: {c.split('--')[0]}{i}"
                                                                   for i, (p, c, _) in enumerate(MISTAKES)])
def test_every_user_mistake_is_one_line_and_exit_2_and_writes_nothing(program, command, words, inputs, tmp_path,
                                                                      monkeypatch, capsys):
    """Offline (every download fails) and without pretrained weights at hand. Nothing among the inputs changes
    (no file replaced, lost, or left half-written, no code run from a pickle), and nothing is written for {new} (at
    most an empty log, when an image turns out broken once training has begun)."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    def no_dataset(self):
        raise RuntimeError("Error downloading: no network")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    for dataset in (torchvision.datasets.MNIST, torchvision.datasets.CIFAR10):
        monkeypatch.setattr(dataset, "download", no_dataset)
    new = str(tmp_path / "new")
    argv = shlex.split(command.format(**inputs, new=new))
    before = [snapshot(inputs["d"]), snapshot(inputs["vaerun"])]
    with pytest.raises(SystemExit) as e:
        (vae if program == "vae" else kl).main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{'vae.py' if program == 'vae' else 'kl_autoencoder.py'}: "
                                                         f"error: "), err
    for word in words:
        assert (word[1:] not in err) if word.startswith("!") else (word.format(**inputs) in err), (word, err)
    assert [snapshot(inputs["d"]), snapshot(inputs["vaerun"])] == before
    assert not os.path.exists(new) or set(snapshot(new).items()) <= {("metrics.jsonl", b"")}


FULL_DISK = [  # (program, command with --overwrite, the file it writes that fails)
    ("kl", R + W + "--overwrite", "{new}.png"),
    ("kl", "encode " + W + "--data {d}/imgs --resolution 32 --overwrite --out {new}.safetensors", "{new}.safetensors"),
    ("kl", T + "--steps 1 --disc-weight 0 --overwrite", "{new}/ckpt.pt"),
    ("kl", "eval --ckpt {d}/klrun/ckpt.pt --device cpu --out {new} --overwrite", "{new}/reconstructions.png"),
    ("vae", VAE + "--epochs 1 --overwrite " + " ".join(TINY), "{new}/ckpt.pt"),
    ("vae", "--eval-only --ckpt {vaerun}/ckpt.pt --data-dir {mnist} --out {new} --eval-samples 2 --overwrite",
     "{new}/samples.png")]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux), a file on a disk that is full")
@pytest.mark.parametrize("program, command, written", FULL_DISK, ids=[f"{p} {w}" for p, _, w in FULL_DISK])
def test_a_full_disk_is_one_line_and_exit_2_and_no_part_of_a_file(program, command, written, inputs, tmp_path, capsys):
    """Every file is written as NAME.PID.tmp and renamed; here that is /dev/full, where every write fails (ENOSPC).
    Image encoders and torch.save writing to a path report nothing there (they left truncated files, exit 0): the
    failure must be seen and said in one line, exit 2, the earlier file intact, and no .tmp left."""
    new = str(tmp_path / "new")
    path = written.format(new=new)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"an earlier file")
    with open(path + ".tmp", "wb") as f:  # a user's file, named as our temporary files once were: kept
        f.write(b"mine")
    os.symlink("/dev/full", f"{path}.{os.getpid()}.tmp")  # (main runs in this process)
    with pytest.raises(SystemExit) as e:
        (vae if program == "vae" else kl).main(shlex.split(command.format(**inputs, new=new)))
    assert e.value.code == 2
    (one_line_error if program == "vae" else kl_error)(capsys, "No space left on device", path)
    assert open(path, "rb").read() == b"an earlier file" and not os.path.lexists(f"{path}.{os.getpid()}.tmp")
    assert open(path + ".tmp", "rb").read() == b"mine"


@pytest.mark.parametrize("program", [vae, kl])
def test_a_log_line_cut_short_is_replaced_by_the_next_record(program, tmp_path):
    """An append that a full disk or kill -9 cut short leaves a last line without its newline; the next record (an
    --eval-only's, a resumed run's) goes in its place, so that every line of the log stays JSON."""
    path = str(tmp_path / "metrics.jsonl")
    program.append_jsonl(path, {"epoch": 1})
    with open(path, "a") as f:
        f.write('{"epoch": 2, "lo')
    program.append_jsonl(path, {"epoch": 2})
    program.append_jsonl(path, {"epoch": 3})
    assert read_metrics(str(tmp_path)) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    os.remove(path)
    with open(path, "w") as f:
        f.write('{"epo')  # cut short in the first line
    program.append_jsonl(path, {"epoch": 1})
    assert read_metrics(str(tmp_path)) == [{"epoch": 1}]


def test_a_train_checkpoint_given_as_weights_is_read_as_its_weights(kl_data, tmp_path):
    """--weights runs/kl/ckpt.pt (a user's natural mistake for --ckpt, or a fine-tune from it) reads its model's
    weights: reconstruct gives what --ckpt gives (it was refused, "1 unexpected, e.g. logvar")."""
    kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "1", "--disc-weight", "0", "--out", str(tmp_path / "run")])
    write_test_image(tmp_path / "in.png", 32, 32)
    for source in (["--ckpt", str(tmp_path / "run" / "ckpt.pt")], ["--weights", str(tmp_path / "run" / "ckpt.pt"),
                                                                 "--preset", "tiny"]):
        kl.main(["reconstruct", *source, "--device", "cpu", "--image", str(tmp_path / "in.png"), "--out",
                 str(tmp_path / f"{source[0][2:]}.png")])
    assert (tmp_path / "ckpt.png").read_bytes() == (tmp_path / "weights.png").read_bytes()


def test_a_vae_run_resumes_from_a_backup_of_its_checkpoint_in_its_own_folder(data_dir, tmp_path):
    argv = ["--data-dir", data_dir, *TINY, "--out", str(tmp_path)]
    vae.main([*argv, "--epochs", "1"])
    shutil.copy(tmp_path / "ckpt.pt", tmp_path / "backup.pt")
    vae.main([*argv, "--epochs", "2", "--resume", "--ckpt", str(tmp_path / "backup.pt")])  # its run's folder: ours
    assert torch.load(tmp_path / "backup.pt", weights_only=True)["epoch"] == 2


def test_a_resume_reads_past_log_lines_edited_by_hand(data_dir, kl_data, tmp_path):
    """Lines of metrics.jsonl that are no record of ours (not JSON, or another object) stop no --resume; they are left
    out of the log it goes on with."""
    vae_argv = ["--data-dir", data_dir, *TINY, "--out", str(tmp_path / "vae")]
    kl_argv = ["train", "--data", kl_data, *KL_TINY, "--disc-weight", "0", "--out", str(tmp_path / "kl")]
    for main, argv, more in ((vae.main, vae_argv, ["--epochs", "2"]), (kl.main, kl_argv, ["--steps", "2"])):
        main([*argv, *more[:1], "1"])
        with open(os.path.join(argv[argv.index("--out") + 1], "metrics.jsonl"), "a") as f:
            f.write('my notes\n{"note": "mine"}\n{"kind": "note", "step": "x", "epoch": null}\n')
        main([*argv, *more, "--resume"])
        log = read_metrics(argv[argv.index("--out") + 1])  # (every line JSON: "my notes" is gone)
        assert [r.get("epoch", r.get("step")) for r in log if r["kind"] in ("epoch", "train")] == [1, 2], log
        assert {"note": "mine"} not in log


@pytest.mark.parametrize("program", [vae, kl])
def test_a_folder_on_a_file_system_without_locks_is_used_unlocked(program, tmp_path, monkeypatch):
    """flock fails with ENOSYS on Lustre's default mount (ENOLCK on some NFS): a run goes on there, unlocked; a lock
    another process holds (BlockingIOError) is still refused."""
    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(program.fcntl, "flock", no_locks)
    program.check_writable(str(tmp_path / "run"))
    assert str(tmp_path / "run") not in program.LOCKED and os.path.isdir(tmp_path / "run")


def test_a_run_may_keep_its_checkpoint_elsewhere(data_dir, tmp_path, capsys):
    vae.main(["--data-dir", data_dir, "--out", str(tmp_path / "o"), "--ckpt", str(tmp_path / "c.pt"), "--epochs", "1",
              *TINY])
    assert f"the checkpoint: {tmp_path / 'c.pt'}" in capsys.readouterr().out and os.path.isfile(tmp_path / "c.pt")


@pytest.mark.parametrize("case", ["out is a file", "eval-only, out is a file", "out under a file"])
def test_vae_unwritable_out_fails_before_any_work(trained, data_dir, tmp_path, capsys, monkeypatch, case):
    (tmp_path / "file").write_text("a file")
    monkeypatch.setattr(vae, "load_mnist", lambda *a: pytest.fail("loaded data before checking --out"))
    args = {"out is a file": ["--out", str(tmp_path / "file")],
            "eval-only, out is a file": ["--eval-only", "--ckpt", os.path.join(trained[0], "ckpt.pt"),
                                         "--out", str(tmp_path / "file")],
            "out under a file": ["--out", str(tmp_path / "file" / "run")]}[case]
    assert run_main(["--data-dir", data_dir, *TINY, *args]) == 2
    one_line_error(capsys, "file")


UNWRITABLE = [  # (program, command writing into {ro}, a folder without write permission)
    ("vae", VAE.replace("{new}", "{ro}") + "--epochs 1 " + " ".join(TINY)),
    ("kl", T.replace("{new}", "{ro}") + "--steps 1"),
    ("kl", "eval --ckpt {d}/klrun/ckpt.pt --device cpu --out {ro}"),
    ("kl", "encode " + W + "--data {d}/imgs --out {ro}/lat.safetensors"),
    ("kl", "decode " + W + "--latents {d}/lat.safetensors --out {ro}"),
    ("kl", "decode " + W + "--latents {d}/lat.safetensors --out {ro}/new"),
    ("kl", R.replace("{new}", "{ro}/out") + W),
    ("kl", "convert " + W + "--export {ro}/vae.safetensors")]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0 and not shutil.which("setpriv"),
                    reason="needs POSIX permissions, and as root setpriv (util-linux) to give up root's right to write")
def test_a_folder_without_write_permission_is_one_line_and_exit_2(inputs, tmp_path):
    """Every command, asked to write into a folder it may not write to (mode 0o500), says "Permission denied" and the
    folder in one line, exits 2 and writes nothing. Root may write anywhere, so as root the commands run in a child that
    has given up that right (CAP_DAC_OVERRIDE); all in one child, to import torch once."""
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    commands = [(p, shlex.split(c.format(**inputs, ro=ro))) for p, c in UNWRITABLE]
    child = ("import contextlib, io, json, sys, vae, kl_autoencoder as kl\nresults = []\n"
             "for program, argv in json.loads(sys.argv[1]):\n    err = io.StringIO()\n"
             "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):\n"
             "        try:\n            (vae if program == 'vae' else kl).main(argv)\n            code = 0\n"
             "        except SystemExit as e:\n            code = e.code\n    results.append([code, err.getvalue()])\n"
             "print(json.dumps(results))")
    unroot = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all"] * (os.geteuid() == 0)
    done = subprocess.run([*unroot, sys.executable, "-c", child, json.dumps(commands)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert done.returncode == 0, done.stderr
    for (program, argv), (code, err) in zip(commands, json.loads(done.stdout)):
        name = "vae.py" if program == "vae" else "kl_autoencoder.py"
        assert code == 2 and err.count("\n") == 1 and err.startswith(f"{name}: error: "), (argv, err)
        assert "Permission denied" in err and str(ro) in err and "tmp" not in err.replace(str(tmp_path), ""), err
    assert os.listdir(ro) == []


def test_vae_nan_in_the_first_epoch_says_no_checkpoint_was_written(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(vae, "train_epoch", lambda *args, **kwargs: [float("nan")] * 3)
    assert run_main(["--data-dir", data_dir, "--out", str(tmp_path), *TINY]) == 2
    one_line_error(capsys, "nan", "no checkpoint yet")
    calls = []
    monkeypatch.setattr(vae, "train_epoch", lambda *a, **k: calls.append(1) or [0.0 if len(calls) < 3 else float("nan")] * 3)
    assert run_main(["--data-dir", data_dir, "--out", str(tmp_path / "later"), *TINY]) == 2
    one_line_error(capsys, "nan", "in epoch 3", "holds the last good epoch, 2")
    assert torch.load(str(tmp_path / "later" / "ckpt.pt"), weights_only=True)["epoch"] == 2


def test_kl_nan_before_the_first_checkpoint_says_so(kl_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(kl, "reconstruction_loss", lambda x, x_rec, kind="l1": (x - x_rec) * float("nan"))
    with pytest.raises(SystemExit):
        kl.main(["train", "--data", kl_data, *KL_TINY, "--steps", "8", "--disc-weight", "0", "--log-every", "1",
                 "--out", str(tmp_path / "r")])
    kl_error(capsys, "nan", "no checkpoint yet")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_fails_cleanly(data_dir, tmp_path, capsys):
    assert run_main(["--device", "cuda", "--data-dir", data_dir, "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "--device cuda")


PRETRAINED_USERS = {  # each command that loads torchvision's weights from $TORCH_HOME/hub/checkpoints
    "kl train (VGG16)": torchvision.models.VGG16_Weights.IMAGENET1K_V1.url,
    "kl eval --fid (Inception)": kl.INCEPTION.url,
    "vae.py --fid (Inception)": vae.INCEPTION.url,
}


@pytest.mark.parametrize("command", PRETRAINED_USERS)
def test_a_planted_pretrained_network_file_is_refused_and_never_run(command, kl_data, data_dir, tmp_path, monkeypatch, capsys):
    """README tells offline users to put these files into $TORCH_HOME/hub/checkpoints by hand, and torch.hub
    checks a hash only when it downloads: a pickle planted there under the expected name must not run."""
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    planted = hub / os.path.basename(PRETRAINED_USERS[command])
    marker = tmp_path / "ran"
    torch.save({"features.0.weight": RunsCode(str(marker))}, str(planted))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("the file is there: no download"))
    if command.startswith("vae.py"):
        code = run_main(["--data-dir", data_dir, "--out", str(tmp_path / "run"), *TINY, "--fid"])
        one_line_error(capsys, str(planted), "sha256", "not loaded")
    else:
        argv = ["train", "--data", kl_data, *KL_TINY, "--steps", "1", "--out", str(tmp_path / "run")]
        if "eval" in command:
            kl.main(argv)
            capsys.readouterr()
            argv = ["eval", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--device", "cpu", "--fid"]
        else:
            argv[argv.index("--perceptual-weight") + 1] = "1"
        with pytest.raises(SystemExit) as e:
            kl.main(argv)
        code = e.value.code
        kl_error(capsys, str(planted), "sha256", "not loaded")
    assert code == 2 and not marker.exists()
    assert planted.exists()  # the user's file is refused, not deleted


# ----------------------------------------------------------------------------- signals, progress, the helpers both files write

def test_a_failed_command_ends_its_dataloader_workers_at_once(kl_data, tmp_path, capsys):
    """main() called from Python (a notebook, these tests) that fails while its DataLoader workers run leaves none
    behind: left to the garbage collector (the traceback's frames hold them in a cycle), each took 5 s to end, since
    the queue that tells them to stop is closed first; 10 s of this suite went there."""
    (tmp_path / "imgs").mkdir()
    for i in range(12):
        write_test_image(tmp_path / "imgs" / f"{i:02d}.png", 32, 32)
    (tmp_path / "imgs" / "07.png").write_bytes(b"\x89PNG broken")
    argv = ["train", "--data", str(tmp_path / "imgs"), *KL_TINY, "--workers", "1", "--val-size", "2", "--out",
            str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        kl.main(argv)
    kl_error(capsys, "07.png", "cannot decode")
    assert e.value.code == 2 and multiprocessing.active_children() == []


@pytest.mark.parametrize("program", ["vae", "kl", "kl encode"])
def test_sigterm_ends_a_run_like_ctrl_c(program, data_dir, tiny_weights, tmp_path):
    """A real process group (kl: with 2 DataLoader workers, which torch's handler killed loudly), stopped by SIGTERM
    as a job scheduler does, after its first log line: one line, exit 130, the last checkpoint kept, no .tmp; encode
    (stopped once its 2 workers run) leaves no latents file."""
    out, folder = tmp_path / "run", tmp_path / "images"
    if program.startswith("kl"):
        folder.mkdir()
        for i, image in enumerate(torch.from_numpy(smooth_images(24 if program == "kl" else 80, 32)).permute(0, 3, 1, 2)):
            torchvision.io.write_png(image.contiguous(), str(folder / f"{i}.png"))
    argv = ["vae.py", "--data-dir", data_dir, "--epochs", "100000", *TINY] if program == "vae" else [
        "kl_autoencoder.py", "train", "--data", str(folder), "--workers", "2", *KL_TINY, "--val-size", "8",
        "--disc-weight", "0", "--steps", "100000", "--log-every", "1", "--ckpt-every", "1"] if program == "kl" else [
        "kl_autoencoder.py", "encode", "--weights", tiny_weights, "--preset", "tiny", "--data", str(folder), "--workers",
        "2", "--batch-size", "1", "--resolution", "256", "--device", "cpu"]
    if program == "kl encode":
        out.mkdir()
        out = out / "lat.safetensors"
    process = subprocess.Popen([sys.executable, *argv, "--out", str(out)], cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    def children():  # (Linux)
        with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
            return f.read().split()
    while program == "kl encode" and len(children()) < 2:  # until encode's 2 workers run
        time.sleep(0.02)
    for line in process.stdout if program != "kl encode" else []:  # the first finished epoch, or the second step
        if line.startswith(("epoch", "step      2")):  # (the first is saved)
            break
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().splitlines() == [
        "vae.py: interrupted; the checkpoint of the last finished epoch is kept" if program == "vae" else
        "kl_autoencoder.py: interrupted; the last checkpoint is kept" if program == "kl" else
        "kl_autoencoder.py: interrupted; no file is left half-written"], err
    if program == "kl encode":
        assert os.listdir(out.parent) == [], os.listdir(out.parent)
        return
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt.get("epoch", ckpt.get("step")) >= 1 and not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("program", ["vae", "kl"])
def test_main_puts_back_the_sigterm_handler_it_found(program, data_dir, tmp_path):
    """main() turns SIGTERM into Ctrl-C while it runs, and puts the caller's handler back, also after an error:
    otherwise a later SIGTERM (a CI timeout's) would become a KeyboardInterrupt in whatever runs next."""
    def mine(signum, frame):
        pass
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        main = vae.main if program == "vae" else kl.main
        with pytest.raises(SystemExit):
            main(["--data-dir", data_dir, "--out", str(tmp_path), "--lr", "-1"] if program == "vae" else ["eval", "--ckpt", "none"])
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_long_work_shows_progress_and_quick_work_does_not(monkeypatch, capsys):
    """Not a terminal here: after its fifth second, a line per tenth of the work (images done, rate, time left)."""
    clock = iter([0.0] + [1.0 + 3 * i for i in range(10)])  # the start, then one update every 3 s from t = 1 s
    monkeypatch.setattr(time, "time", lambda: next(clock))
    progress = vae.Progress("test NLL (K=5000)", 100)
    for _ in range(10):
        progress.update(10)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("test NLL (K=5000): 30/100 images, 4.3 images/s, 16 s left")  # t = 7 s, the first
    assert len(lines) == 8 and lines[-1].startswith("test NLL (K=5000): 100/100 images")
    clock = iter([0.0, 1.0, 2.0])
    quick = vae.Progress("quick", 20)
    quick.update(10), quick.update(10)
    assert capsys.readouterr().out == ""


SHARED = ["UserError", "Parser", "_number", "get_device", "load_pretrained", "load_inception", "load_checkpoint",
          "check_writable", "Progress", "interrupt"]  # the block at the end of each file


IN_PLACE = ["frechet_distance", "write_atomically", "append_jsonl", "read_jsonl"]  # where each file uses them, above a comment


@pytest.mark.parametrize("name", SHARED + IN_PLACE)
def test_the_helpers_both_files_write_stay_identical(name):
    """Each script stands alone, so a few helpers are written in both: they must not drift apart. Those of the
    command line and the files are in one block at the end of each file; the others say where their twin is."""
    assert inspect.getsource(getattr(vae, name)) == inspect.getsource(getattr(kl, name))
    for module in (vae, kl):
        lines = open(module.__file__).read().split("\n")
        start = inspect.getsourcelines(getattr(module, name))[1]
        block = next(i for i, line in enumerate(lines) if line.startswith("# Shared with"))
        assert (start > block) == (name in SHARED), f"{module.__name__}.{name}"
        if name in IN_PLACE:
            assert lines[start - 2].startswith("# A deliberate copy of"), f"{module.__name__}.{name}"


@pytest.mark.parametrize("module", [vae, kl], ids=["vae", "kl_autoencoder"])
def test_functions_and_lines_are_short(module):
    source = open(module.__file__).read()
    assert max(len(line) for line in source.split("\n")) <= 120
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            assert node.end_lineno - start + 1 <= 50, f"{node.name} has {node.end_lineno - start + 1} lines"
