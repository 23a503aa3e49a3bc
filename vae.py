"""
A variational autoencoder on MNIST, in one file, to be read top to bottom.

    python vae.py --device cuda          # train, evaluate (nats per test image), draw pictures into runs/vae
    python vae.py --epochs 2 --eval-samples 100       # a quick try: a few minutes on a CPU
    python vae.py --eval-only --eval-samples 5000     # the literature's NLL protocol on runs/vae/ckpt.pt
    python vae.py --preset iwae          # Burda et al. 2015, Table 1, one stochastic layer
    python vae.py --help                 # every option: the fields of Config, and where files go

The model (Kingma & Welling 2014): an encoder q(z|x) = N(mu(x), diag exp(logvar(x))), a prior p(z) = N(0, I) and a
decoder p(x|z), by default Bernoullis on dynamically binarized pixels: every number is a log-likelihood in nats per test
image, as in the literature (Burda et al. 2015, Table 1). Training maximises the ELBO, the importance-weighted bound
(--train-samples K) or a beta-VAE objective (--beta, --capacity); evaluation reports the test -ELBO, the test NLL with K
importance samples, the active units, the aggregate posterior, the mutual information and, with --fid, an FID.

Part I uses nothing defined after it: copied as one block, it is a program. Used so, on MNIST's 60,000 training and
10,000 test images as rows of 784 intensities in [0, 1]:

    import torch, torchvision
    from vae import Config, VAE, init_output_bias, prepare_test_set, train, evaluate  # or Part I, pasted above
    x_train, x_test_grey = (torchvision.datasets.MNIST("data", train=split, download=True).data.flatten(1) / 255
                            for split in (True, False))
    cfg = Config(epochs=2, eval_samples=100)
    x_test = prepare_test_set(x_test_grey, cfg.likelihood)  # binarized once, with a fixed seed
    torch.manual_seed(cfg.seed)
    model = VAE(cfg.arch, cfg.hidden, cfg.latent_dim, cfg.activation, cfg.likelihood)
    init_output_bias(model, x_train)
    for record, optimizer in train(model, x_train, x_test, cfg):
        print(record["epoch"], record["test_nelbo"])
    print(evaluate(model, x_test_grey, x_test, cfg))

Part II runs it: data, pictures, the run and its checkpoints, the command line generated from Config, main, and the
helpers kl_autoencoder.py writes too.
"""

import argparse
import contextlib
import dataclasses
import gzip
import io
import json
import math
import os
import pathlib
import pickle
import sys
import time

try:
    import fcntl  # POSIX: a run locks its folder (lock_folder); not on Windows
except ImportError:
    fcntl = None

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF


# =============================================================================
# PART I: the VAE and its objective
# =============================================================================

# -----------------------------------------------------------------------------
# model

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


def mlp(sizes, activation, bias_last=True):
    """Linear layers of the given sizes with `activation` between them (not after the last)."""
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        last = i == len(sizes) - 2
        layers += [nn.Linear(n_in, n_out, bias=bias_last or not last)] + ([] if last else [activation()])
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """q(z|x) = N(mu(x), diag exp(logvar(x))),  p(z) = N(0, I),  p(x|z) from decode(z).

    decode(z) gives, per pixel, Bernoulli logits (likelihood "bernoulli") or the mean of a Gaussian (likelihood
    "gaussian"). The Gaussian's variance is one learned scalar, exp(dec_logvar), shared by all pixels and trained with
    the rest (the calibrated decoder of Rybkin et al. 2021): a fixed variance of 1 would make the reconstruction term
    negligible against the KL, and the learned one settles at the mean squared error. Both decoders end in a
    per-pixel bias, `out_bias`, which init_output_bias() sets from the training data.

    arch "mlp": x -> MLP(hidden) -> (mu, logvar); z -> MLP(reversed hidden) -> 784. arch "conv": two stride-2 4x4
    convolutions (28 -> 14 -> 7, 32 and 64 channels) then the MLP; the decoder mirrors it with transposed ones."""

    def __init__(self, arch="mlp", hidden=(512, 512), latent_dim=32, activation="elu", likelihood="bernoulli"):
        super().__init__()
        act, hidden = ACTIVATIONS[activation], list(hidden)
        if arch == "mlp":
            self.encoder = mlp([784, *hidden, 2 * latent_dim], act)
            self.decoder = mlp([latent_dim, *hidden[::-1], 784], act, bias_last=False)
        else:
            self.encoder = nn.Sequential(
                nn.Unflatten(-1, (1, 28, 28)),
                nn.Conv2d(1, 32, 4, 2, 1), act(), nn.Conv2d(32, 64, 4, 2, 1), act(), nn.Flatten(),
                mlp([64 * 7 * 7, *hidden, 2 * latent_dim], act))
            self.decoder = nn.Sequential(
                mlp([latent_dim, *hidden[::-1], 64 * 7 * 7], act), act(), nn.Unflatten(-1, (64, 7, 7)),
                nn.ConvTranspose2d(64, 32, 4, 2, 1), act(), nn.ConvTranspose2d(32, 1, 4, 2, 1, bias=False),
                nn.Flatten())
        self.out_bias = nn.Parameter(torch.zeros(784))
        self.latent_dim, self.likelihood = latent_dim, likelihood
        if likelihood == "gaussian":
            self.dec_logvar = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        """x (..., 784) -> mu, logvar (..., latent_dim), in float32 even under autocast."""
        h = self.encoder(x.reshape(-1, 784)).float()
        mu, logvar = h.reshape(*x.shape[:-1], -1).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z):
        """z (..., latent_dim) -> per-pixel logits or Gaussian means (..., 784), float32."""
        out = self.decoder(z.reshape(-1, z.shape[-1])).float()
        return out.reshape(*z.shape[:-1], 784) + self.out_bias

    def log_likelihood(self, x, z):
        """log p(x|z) in nats, summed over the 784 pixels: shape z.shape[:-1]."""
        out = self.decode(z)
        if self.likelihood == "bernoulli":
            return log_bernoulli(x, out)
        return log_normal(x, out, self.dec_logvar)

    def mean(self, z):
        """E[x|z] in [0, 1], for pictures and FID."""
        out = self.decode(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0, 1)


@torch.no_grad()
def init_output_bias(model, x_train):
    """Start the decoder at the mean training image: Bernoulli logit of the mean pixel, clipped to [0.001, 0.999] as
    in Burda et al.'s code, or the mean itself for the Gaussian."""
    p = x_train.mean(0)
    model.out_bias.copy_(torch.logit(p.clamp(1e-3, 1 - 1e-3)) if model.likelihood == "bernoulli" else p)

# -----------------------------------------------------------------------------
# the math: every formula of the paper, in nats

LOG_2PI = math.log(2 * math.pi)


def reparameterize(mu, logvar):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I): a sample of N(mu, diag exp(logvar)) that is differentiable in mu
    and logvar (Kingma & Welling 2014, section 2.4). Same shape as mu."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) = 1/2 sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j) (Kingma & Welling
    2014, appendix B), in nats, summed over the last (latent) dimension. exp(v) - 1 is computed as expm1(v), which
    keeps each term >= 0 in floating point near v = 0."""
    return 0.5 * (mu.pow(2) + torch.expm1(logvar) - logvar).sum(-1)


def log_bernoulli(x, logits):
    """log p(x | logits) = sum_d x_d log s(l_d) + (1 - x_d) log(1 - s(l_d)),  s = sigmoid, computed as
    sum_d x_d l_d + log s(-l_d) (since log s(l) - log s(-l) = l and 1 - s(l) = s(-l)), which is exact and finite for
    any logit. In nats, summed over the last (pixel) dimension."""
    return (x * logits + F.logsigmoid(-logits)).sum(-1)


def log_normal(x, mu, logvar):
    """log N(x; mu, diag exp(logvar)) = -1/2 sum_d (log 2 pi + logvar_d + (x_d - mu_d)^2 / exp(logvar_d)),
    in nats, summed over the last dimension (mu and logvar broadcast against x)."""
    return -0.5 * (LOG_2PI + logvar + (x - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def elbo(x, mu, logvar, log_likelihood):
    """ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z)) <= log p(x), nats per example.

    q(z|x) = N(mu, diag exp(logvar)), p(z) = N(0, I). The expectation is estimated with one reparameterized sample,
    the KL is exact. `log_likelihood(x, z)` is any decoder's log p(x|z), summed over data dimensions. Returns
    (elbo, log p(x|z), KL), each of shape mu.shape[:-1]: the beta-VAE and capacity objectives weight them otherwise."""
    z = reparameterize(mu, logvar)
    log_px_z = log_likelihood(x, z)
    kl = gaussian_kl(mu, logvar)
    return log_px_z - kl, log_px_z, kl


def iwae_bound(x, mu, logvar, log_likelihood, k):
    """L_K(x) = E[log (1/K) sum_k p(x, z_k) / q(z_k|x)], z_1..z_K ~ q(z|x) i.i.d. (Burda et al. 2015).

    One draw of the K samples; log-mean-exp = logsumexp_k(log w_k) - log K, in nats per example. L_1 is the ELBO,
    L_K grows with K and tends to log p(x). Shape mu.shape[:-1]."""
    z = reparameterize(mu.expand(k, *mu.shape), logvar.expand(k, *logvar.shape))
    zero = z.new_zeros(())
    log_w = log_likelihood(x, z) + log_normal(z, zero, zero) - log_normal(z, mu, logvar)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def beta_vae_loss(log_px_z, kl, beta):
    """Higgins et al. 2017: -log p(x|z) + beta * KL, nats per example (both terms summed over their dimensions, so
    beta = 1 is the negative ELBO; a paper that averages the reconstruction over the 784 pixels instead and weights the
    summed KL by b has beta = 784 * b here)."""
    return -log_px_z + beta * kl


def capacity_loss(log_px_z, kl, gamma, capacity):
    """Burgess et al. 2018: -log p(x|z) + gamma * |KL - C|, nats per example, with C in nats."""
    return -log_px_z + gamma * (kl - capacity).abs()


def capacity_at(step, c_max, iters):
    """C = C_max * min(1, step / iters): rises linearly from 0 and stays at C_max after `iters` steps."""
    return c_max * min(1.0, step / iters)

# -----------------------------------------------------------------------------
# training: the recipe (every choice of a run, with its default), the data each step sees, an epoch, the loop

def option(default, help, **argparse_keywords):
    """A field of Config: its default, and the help (and any choices, nargs or metavar) of its command-line option."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_keywords})


@dataclasses.dataclass
class Config:
    """A run: the model, the objective, the optimizer and its schedule, the evaluation; an option each (Part II)."""
    arch: str = option("mlp", "mlp, or convolutions (decoder: transposed)", choices=("mlp", "conv"))
    hidden: tuple = option((512, 512), "hidden layer widths of the encoder MLP (the decoder mirrors them)", nargs="+")
    latent_dim: int = option(32, "dimensions of z")
    activation: str = option("elu", "between the layers", choices=("relu", "tanh", "elu"))
    likelihood: str = option("bernoulli", "bernoulli: binarized pixels; gaussian: dequantized grey levels, learned "
                                          "variance", choices=("bernoulli", "gaussian"))
    beta: float = option(1.0, "beta-VAE (Higgins et al. 2017): -log p(x|z) + beta * KL")
    capacity: float = option(None, "Burgess et al.: -log p(x|z) + gamma |KL - C|, C rising to C_MAX", metavar="C_MAX")
    capacity_iters: int = option(100_000, "steps for C to reach C_MAX")
    gamma: float = option(1000.0, "weight of |KL - C|")
    train_samples: int = option(1, "K of the importance-weighted bound trained on (1: the ELBO)")
    epochs: int = option(100, "passes over the training images")
    batch_size: int = option(128, "images per step")
    lr: float = option(1e-3, "Adam's learning rate")
    lr_schedule: str = option("cosine", "per epoch; iwae: 3^i epochs at lr 10^(-i/7), i = 0..7",
                              choices=("constant", "cosine", "iwae"))
    adam_eps: float = option(1e-8, "Adam's epsilon")
    seed: int = option(0, "the initial weights and every random draw of training")
    amp: bool = option(False, "bf16 autocast for the networks on CUDA (the math stays float32)")
    compile: bool = option(False, "torch.compile the forward pass")
    eval_samples: int = option(1000, "K of the importance-sampled test NLL (the literature uses 5000)")
    fid_samples: int = option(10_000, "prior samples for FID (--fid), against as many test images")


def prepare(x, likelihood, generator=None):
    """Turn intensities in [0, 1] into what the likelihood models, with fresh noise on every call.

    bernoulli: dynamic binarization, x ~ Bernoulli(intensity) (Burda et al. 2015). gaussian: uniform dequantization,
    x = (255 * intensity + u) / 256, u ~ U[0, 1) (Theis et al. 2016). A density p on [0, 1]^784 then bounds the
    likelihood of the 8-bit images after a change of units: log P(image) >= E_u[log p(x)] - 784 ln 256, i.e. add
    784 ln 256 = 4347.4 nats to its NLL."""
    if likelihood == "bernoulli":
        return torch.bernoulli(x, generator=generator)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (x * 255 + u) / 256


def lr_at(epoch, cfg):
    """Learning rate for 0-based `epoch`: constant, cosine from lr towards 0 over the run, or the IWAE stages (3^i
    epochs at lr * 10^(-i/7), i = 0, 1, ..., staying in the last one reached)."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.lr_schedule == "iwae":
        stage, end = 0, 1
        while epoch >= end and stage < 7:
            stage += 1
            end += 3 ** stage
        return cfg.lr * 10 ** (-stage / 7)
    return cfg.lr


def train_terms(model, x, k):
    """What one training step needs, per example: (log p(x|z), KL) for the ELBO family (k = 1), or (L_K, KL) for the
    importance-weighted bound (k > 1; the KL is then only logged)."""
    mu, logvar = model.encode(x)
    if k > 1:
        return iwae_bound(x, mu, logvar, model.log_likelihood, k=k), gaussian_kl(mu, logvar)
    _, log_px_z, kl = elbo(x, mu, logvar, model.log_likelihood)
    return log_px_z, kl


def train_epoch(model, opt, x_train, cfg, epoch, terms_fn=train_terms):
    """One pass over a fresh permutation of the training set. Batches are slices of one tensor on the device; nothing
    leaves the device until the sums are read at the end. Returns the means of the training loss, of the bound
    (-ELBO, or -L_K when K > 1) and of the KL, in nats per example."""
    model.train()
    n, bs = len(x_train), cfg.batch_size
    steps = n // bs  # the remainder of the permutation is dropped; it changes every epoch
    x_epoch = prepare(x_train[torch.randperm(n, device=x_train.device)], cfg.likelihood)
    sums = torch.zeros(3, device=x_train.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp)
    for i in range(steps):
        x = x_epoch[i * bs:(i + 1) * bs]
        with autocast:
            terms = terms_fn(model, x, cfg.train_samples)
        if cfg.train_samples > 1:  # the importance-weighted bound L_K; its KL is only logged
            l_k, kl = terms
            loss = bound = -l_k.mean()
        else:  # the ELBO's two terms, weighted by the objective
            log_px_z, kl = terms
            bound = (kl - log_px_z).mean()
            if cfg.capacity is not None:
                c = capacity_at(epoch * steps + i, cfg.capacity, cfg.capacity_iters)
                loss = capacity_loss(log_px_z, kl, cfg.gamma, c).mean()
            else:
                loss = beta_vae_loss(log_px_z, kl, cfg.beta).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sums += torch.stack([loss, bound, kl.mean()]).detach()
    return (sums / steps).tolist()


@torch.no_grad()
def test_elbo(model, x_test, batch_size=2000):
    """Test -ELBO and KL, nats per example (one-sample estimate of the expectation)."""
    model.eval()
    sums = torch.zeros(2, device=x_test.device)
    for x in x_test.split(batch_size):
        mu, logvar = model.encode(x)
        value, _, kl = elbo(x, mu, logvar, model.log_likelihood)
        sums += torch.stack([-value.sum(), kl.sum()])
    return (sums / len(x_test)).tolist()


def train(model, x_train, x_test, cfg, first_epoch=0, opt_state=None):
    """Adam (eps cfg.adam_eps), then the epochs first_epoch .. cfg.epochs - 1 (counted from 0), each at the learning
    rate lr_at gives: one train_epoch and the test -ELBO. A generator: `for record, opt in train(...)` runs the epochs,
    yielding each epoch's log record (epochs counted when finished, losses in nats per example) and the optimizer, for
    the caller to log, checkpoint, or stop on a NaN. x_test: prepare_test_set's."""
    fused = x_train.device.type in ("cuda", "cpu")  # one kernel for all parameters; on the CPU about 4x foreach
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=fused)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    terms_fn = torch.compile(train_terms) if cfg.compile else train_terms
    images = len(x_train) // cfg.batch_size * cfg.batch_size
    for epoch in range(first_epoch, cfg.epochs):
        lr = lr_at(epoch, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.time()
        loss, bound, kl = train_epoch(model, opt, x_train, cfg, epoch=epoch, terms_fn=terms_fn)  # one host sync
        seconds = time.time() - t0
        test_nelbo, test_kl = test_elbo(model, x_test)
        yield {"kind": "epoch", "epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_bound": bound, "train_kl": kl,
               "test_nelbo": test_nelbo, "test_kl": test_kl, "seconds": seconds, "images_per_s": images / seconds}, opt

# -----------------------------------------------------------------------------
# evaluation

TEST_SEED = 0  # the test set is binarized once with this seed, and evaluation draws from it too


def prepare_test_set(x_test, likelihood):
    """The test set, binarized (or dequantized) once with a fixed seed: the same on every run and device."""
    return prepare(x_test.cpu(), likelihood, torch.Generator().manual_seed(TEST_SEED)).to(x_test.device)


@torch.no_grad()
def test_nll(model, x_test, k, rows=2 ** 16):
    """-log p(x) estimated by -L_K with K importance samples, nats per example (an upper bound on the NLL that tightens
    as K grows; Burda et al. use K = 5000). The K samples are drawn in chunks of at most `rows` decoder evaluations and
    combined exactly: log (1/K) sum_k w_k = logsumexp_c(L_{K_c} + log K_c) - log K over chunks c. Prints progress."""
    model.eval()
    chunk, done, t0 = min(k, rows), 0, time.time()
    total, cpu = torch.zeros((), dtype=torch.float64, device=x_test.device), x_test.device.type == "cpu"

    def log_likelihood(x, z):  # on the CPU ~832 rows (samples x images) at a time: buffers that stay in the cache
        return torch.cat([model.log_likelihood(x, part) for part in z.split(max(1, 832 // z.shape[1]) if cpu else k)])
    for x in x_test.split(max(1, rows // chunk)):
        mu, logvar = model.encode(x)
        sizes = [min(chunk, k - start) for start in range(0, k, chunk)]
        parts = [iwae_bound(x, mu, logvar, log_likelihood, k=size) + math.log(size) for size in sizes]
        total -= (torch.logsumexp(torch.stack(parts), 0) - math.log(k)).double().sum()
        done += len(x)
        if done * 10 // len(x_test) > (done - len(x)) * 10 // len(x_test):
            print(f"test NLL (K={k}): {done:,}/{len(x_test):,} images, {time.time() - t0:.0f} s", flush=True)
    return total.item() / len(x_test)


@torch.no_grad()
def posterior_means(model, x, batch_size=2000):
    """mu(x) and logvar(x) of q(z|x) for every row of x."""
    model.eval()
    mus, logvars = zip(*(model.encode(b) for b in x.split(batch_size)))
    return torch.cat(mus), torch.cat(logvars)


def active_units(mu, threshold=0.01):
    """Burda et al. 2015: latent dimension i is active when Cov_x(E_q(z|x)[z_i]) > 0.01, the variance over the data of
    the posterior mean. mu: (N, latent_dim)."""
    return int((mu.var(0) > threshold).sum())


def aggregate_posterior(mu, logvar):
    """Mean and std per dimension of q(z) = (1/N) sum_n q(z|x_n): E[z] = mean_n mu_n and Var[z] = mean_n exp(logvar_n)
    + Var_n(mu_n) (law of total variance). For p(z) they are 0 and 1."""
    return mu.mean(0), (logvar.exp().mean(0) + mu.var(0, correction=0)).sqrt()


def kl_per_dimension(mu, logvar):
    """KL(q(z_j|x) || N(0, 1)) for each latent dimension j, in nats, averaged over the rows (images) of mu: shape
    (latent_dim,). Prior and posterior both factorise over dimensions, so the KLs sum to the ELBO's KL; a dimension
    with KL near 0 carries no information about x (its posterior is the prior)."""
    return gaussian_kl(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(0)


@torch.no_grad()
def mutual_information(mu, logvar, rows=256):
    """I(x; z) in nats under q(x, z) = p(x) q(z|x), p(x) the N rows' empirical distribution. Hoffman & Johnson (2016)
    split the ELBO's KL: E_x KL(q(z|x) || p(z)) = I(x; z) + KL(q(z) || p(z)), q(z) = (1/N) sum_n q(z|x_n). Estimated as
    I = mean_n [log q(z_n|x_n) - log q(z_n)], one z_n ~ q(z|x_n) per row, log q(z_n) = logsumexp_m log q(z_n|x_m) -
    log N exactly: unbiased for the empirical p(x); for the true one biased low, never above log N (9.2 nats for 10,000
    images), which it nears when posteriors barely overlap. All N x N log-densities are one matrix product, float64
    (float32 cancels badly for narrow posteriors), `rows` at a time: log N(z_n; mu_m, var_m) = sum_j [z_nj^2, z_nj, 1]
    . [-1 / (2 var_mj), mu_mj / var_mj, c_mj], c_mj = -1/2 (log 2 pi + logvar_mj + mu_mj^2 / var_mj)."""
    z, mu, logvar = reparameterize(mu, logvar).double(), mu.double(), logvar.double()
    inv_var = torch.exp(-logvar)
    z_terms = torch.cat([z.pow(2), z, torch.ones_like(z[:, :1])], dim=1)
    c = -0.5 * (LOG_2PI + logvar + mu.pow(2) * inv_var).sum(-1, keepdim=True)
    q_terms = torch.cat([-0.5 * inv_var, mu * inv_var, c], dim=1)
    log_q_z = torch.cat([torch.logsumexp(part @ q_terms.T, dim=1) for part in z_terms.split(rows)])
    return (log_normal(z, mu, logvar) - (log_q_z - math.log(len(mu)))).mean().item()


# A deliberate copy of kl_autoencoder.py's (each file stands alone); a test keeps the two identical.
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
def fid(model, x_test, n, features):
    """FID between n decoded prior samples E[x|z], z ~ N(0, I), and n test images (grey levels), with `features` the
    feature network (images (N, 784) in [0, 1] -> (N, D)): torchvision's Inception in run(), which makes it
    comparable between runs of this code, not with pytorch-fid."""
    model.eval()
    z = torch.randn(n, model.latent_dim, device=x_test.device)
    fake = torch.cat([model.mean(b) for b in z.split(1000)])
    stats = []
    for images in (fake, x_test[:n]):
        f = features(images)
        stats += [f.mean(0), torch.cov(f.T)]
    return frechet_distance(*stats)


def evaluate(model, x_test_grey, x_test, cfg, features=None):
    """The final record: test -ELBO, test NLL (K = eval_samples), active units, aggregate posterior, KL per latent
    dimension, mutual information I(x; z), and FID when a feature network is given. Seeded, so the same checkpoint
    always gives the same numbers, at the end of training and with --eval-only."""
    torch.manual_seed(TEST_SEED)
    nelbo, kl = test_elbo(model, x_test)
    t0 = time.time()
    nll = test_nll(model, x_test, cfg.eval_samples)
    mu, logvar = posterior_means(model, x_test)
    q_mean, q_std = aggregate_posterior(mu, logvar)
    record = {"kind": "eval", "test_nelbo": nelbo, "test_kl": kl, "test_nll": nll, "eval_samples": cfg.eval_samples,
              "nll_seconds": time.time() - t0, "active_units": active_units(mu), "latent_dim": mu.shape[1],
              "posterior_mean": q_mean.tolist(), "posterior_std": q_std.tolist(),
              "kl_per_dim": kl_per_dimension(mu, logvar).tolist(), "mutual_information": mutual_information(mu, logvar)}
    if features is not None:
        record["fid"] = fid(model, x_test_grey, min(cfg.fid_samples, len(x_test_grey)), features)
        record["fid_samples"] = min(cfg.fid_samples, len(x_test_grey))
    return record

# =============================================================================
# PART II: running it: data, pictures, the run, the command line
# =============================================================================

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_mnist(data_dir, device):
    """Both splits of MNIST as (N, 784) intensities in [0, 1] on `device`, read once through torchvision from
    DATA_DIR/MNIST/raw (downloaded there, or put there by hand, gzipped or not): batches are taken by indexing."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    for path in (os.path.join(raw, name) for name in MNIST_FILES):  # torchvision reads them unpacked
        if not os.path.exists(path) and os.path.exists(path + ".gz"):
            with gzip.open(path + ".gz") as f:
                write_atomically(path, f.read())
    try:
        splits = [torchvision.datasets.MNIST(data_dir, train=train, download=True).data for train in (True, False)]
    except RuntimeError as e:  # not there, and no network
        raise UserError(f"could not get MNIST ({str(e).strip().splitlines()[0]}): put the four IDX files "
                        f"({', '.join(MNIST_FILES)}, gzipped or not) into {raw}, or pass --data-dir")
    return [s.flatten(1).to(device=device, dtype=torch.float32) / 255 for s in splits]


@torch.no_grad()
def inception_features(net, images, batch_size=200):
    """FID's features: images (N, 784) in [0, 1] -> (N, 2048) float64, grey repeated to RGB, resized bilinearly to
    299 x 299 and normalised with ImageNet's mean and std (torchvision's Inception-v3 weights expect it)."""
    resized = (F.interpolate(x.view(-1, 1, 28, 28).expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear")
               for x in images.split(batch_size))  # one batch at a time: 10,000 images at 299 x 299 are 10.7 GB
    return torch.cat([net(TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])).double() for x in resized])

# -----------------------------------------------------------------------------
# pictures

PICTURES = ("samples.png", "reconstructions.png", "interpolations.png", "latent_qq.png", "manifold.png")


def save_grid(images, path, nrow, pad_value=1.0):
    """Images (N, 784), or (N, 1, h, w), in [0, 1] -> one PNG grid, atomically."""
    images = images.detach().float().reshape(len(images), 1, 28, 28) if images.ndim == 2 else images
    grid = torchvision.utils.make_grid(images.clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=pad_value)
    write_atomically(path, torchvision.io.encode_png((grid[:1] * 255).round().to(torch.uint8)).numpy())


def normal_qq(z):
    """A normal Q-Q plot's points for each column of z (N, D): the standard normal's quantiles q_p at p = (i + 1/2) / N,
    (N,), against each column sorted, (N, D). Samples of N(0, 1) lie near y = x (standard error
    sqrt(p(1-p) / N) / phi(q_p))."""
    p = (torch.arange(len(z), dtype=z.dtype, device=z.device) + 0.5) / len(z)
    return torch.special.ndtri(p), z.sort(0).values


def qq_panels(z, size=64, lim=4.0):
    """latent_qq.png's panels: a normal Q-Q plot per latent dimension (the first 64), size x size pixels over
    [-lim, lim]^2, the sorted samples (black) against the normal quantiles, and the line y = x (grey). A dimension
    distributed as the prior lies on the line; a shifted one beside it, a narrow one flatter, a wide one steeper."""
    q, sorted_z = normal_qq(z[:, :64].double().cpu())
    pixel = lambda v: ((v + lim) / (2 * lim) * (size - 1)).round().clamp(0, size - 1).long()  # noqa: E731
    panels, line = torch.ones(sorted_z.shape[1], 1, size, size), torch.arange(size)
    panels[:, 0, size - 1 - line, line] = 0.6
    panels[torch.arange(sorted_z.shape[1]), 0, size - 1 - pixel(sorted_z), pixel(q)[:, None]] = 0.0
    return panels


@torch.no_grad()
def save_pictures(model, x_test, out):
    """samples.png (64 prior samples), reconstructions.png (test inputs above their reconstructions), interpolations.png
    (straight lines between the posterior means of test pairs), latent_qq.png (a sample of q(z|x) per test image, the
    aggregate posterior, against the prior) and, for 2 latents, manifold.png (Kingma & Welling 2014, figure 4)."""
    model.eval()
    torch.manual_seed(TEST_SEED)
    save_grid(model.mean(torch.randn(64, model.latent_dim, device=x_test.device)), os.path.join(out, PICTURES[0]), 8)
    x = x_test[:32]
    mu, _ = model.encode(x)
    save_grid(torch.cat([x[:16], model.mean(mu[:16]), x[16:], model.mean(mu[16:])]), os.path.join(out, PICTURES[1]), 16)
    t = torch.linspace(0, 1, 10, device=mu.device).view(1, 10, 1)
    save_grid(model.mean(mu[:8, None] + t * (mu[8:16] - mu[:8])[:, None]).flatten(0, 1), os.path.join(out, PICTURES[2]),
              10)
    if model.latent_dim == 2:
        q = torch.special.ndtri(torch.linspace(0.05, 0.95, 20, device=mu.device))
        grid = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), -1).reshape(-1, 2)
        save_grid(model.mean(grid), os.path.join(out, PICTURES[4]), 20)
    save_grid(qq_panels(reparameterize(*posterior_means(model, x_test))), os.path.join(out, PICTURES[3]), 8, 0.8)

# -----------------------------------------------------------------------------
# the run

MODEL_KEYS = ("arch", "hidden", "latent_dim", "activation", "likelihood")  # what a checkpoint fixes
PROGRAM, CHECKPOINT_KEYS = "vae.py", {"model", "config", "epoch"}  # what load_checkpoint expects


def run(cfg):
    """Train (unless --eval-only), evaluate and draw the pictures; everything lands in --out. cfg: parse_args's."""
    device = get_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt = open_run(cfg)
    inception = load_inception(device) if cfg.fid else None  # fail before training, not after it
    x_train, x_test_grey = load_mnist(cfg.data_dir, device)
    if cfg.batch_size > len(x_train):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(x_train)} images)")
    x_test, metrics = prepare_test_set(x_test_grey, cfg.likelihood), os.path.join(cfg.out, "metrics.jsonl")
    torch.manual_seed(cfg.seed)
    model = VAE(**{key: getattr(cfg, key) for key in MODEL_KEYS}).to(device)  # (open_run: the checkpoint's, if any)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    else:
        init_output_bias(model, x_train)
        open(metrics, "w").close()
    print(f"{cfg.arch} VAE, {sum(p.numel() for p in model.parameters()):,} parameters, on {device}")
    epoch = ckpt["epoch"] if ckpt else 0
    if not cfg.eval_only:
        epoch = train_and_log(model, ckpt, x_train, x_test, cfg=cfg, metrics=metrics)
    features = (lambda images: inception_features(inception, images)) if inception is not None else None
    record = {**evaluate(model, x_test_grey, x_test, cfg, features=features), "epoch": epoch}
    append_jsonl(metrics, record)
    save_pictures(model, x_test, cfg.out)
    report(record)
    return record


def open_run(cfg):
    """The checkpoint to resume or evaluate (None for a new run), with --out locked. Another run's files in --out are
    kept, unless --overwrite: they are the checkpoint's run's only when the checkpoint is OUT/ckpt.pt."""
    ckpt = load_checkpoint(cfg.ckpt) if cfg.resume or cfg.eval_only else None
    ours = ckpt is not None and os.path.abspath(cfg.ckpt) == os.path.abspath(os.path.join(cfg.out, "ckpt.pt"))
    theirs = [name for name in ("ckpt.pt", "metrics.jsonl", *PICTURES) if os.path.exists(os.path.join(cfg.out, name))]
    if theirs and not ours and not cfg.overwrite:
        raise UserError(f"{cfg.out} holds another run's {theirs[0]}: pass --resume to continue it, another --out, or "
                        f"--overwrite")
    changed = [f"--{k.replace('_', '-')} {ckpt['config'][k]}" for k in MODEL_KEYS
               if cfg.resume and ckpt["config"][k] != getattr(cfg, k)]
    if changed:
        raise UserError(f"{cfg.ckpt} was trained with {', '.join(changed)}: pass the same to --resume it")
    if cfg.eval_only:  # the checkpoint decides the model
        vars(cfg).update({key: ckpt["config"][key] for key in MODEL_KEYS})
    lock_folder(cfg.out)
    return ckpt


def train_and_log(model, ckpt, x_train, x_test, cfg, metrics):
    """train() from the checkpoint's epoch, optimizer and random state, or from the first; after each epoch a line
    printed, one in metrics.jsonl and a checkpoint (everything needed to continue exactly). Returns the epochs done."""
    epoch, opt_state = (ckpt["epoch"], ckpt["optimizer"]) if ckpt else (0, None)
    if ckpt is not None:
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if x_train.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        kept = [r for r in read_jsonl(metrics) if r["epoch"] < epoch or r["epoch"] == epoch and r["kind"] == "epoch"]
        write_atomically(metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())  # the rest is made again
        print(f"resuming {cfg.ckpt} after epoch {epoch}")
    for r, opt in train(model, x_train, x_test, cfg, first_epoch=epoch, opt_state=opt_state):
        if not math.isfinite(r["train_loss"]):  # before its checkpoint: the one saved last stays the last good one
            raise UserError(f"the training loss became {r['train_loss']} in epoch {r['epoch']}: try a lower --lr")
        append_jsonl(metrics, r)  # then the checkpoint: a resume drops log lines after the checkpoint's epoch
        buffer, cuda = io.BytesIO(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": vars(cfg),
                    "epoch": r["epoch"], "rng": {"cpu": torch.get_rng_state(), "cuda": cuda}}, buffer)
        write_atomically(cfg.ckpt, buffer.getbuffer())
        print(f"epoch {r['epoch']:4d}/{cfg.epochs} | train {'-ELBO' if cfg.train_samples == 1 else '-L_K'} "
              f"{r['train_bound']:7.2f} | test -ELBO {r['test_nelbo']:7.2f} | KL {r['test_kl']:6.2f} | "
              f"{r['seconds']:6.2f} s | {r['images_per_s']:9,.0f} img/s", flush=True)
    return max(epoch, cfg.epochs)


def report(r):
    """The final record r, printed: the numbers, then per latent dimension the mean and std of q(z) and the KL."""
    print(f"test -ELBO {r['test_nelbo']:.2f} | test NLL (K={r['eval_samples']}) {r['test_nll']:.2f} nats | active "
          f"units {r['active_units']}/{r['latent_dim']}" + (f" | FID {r['fid']:.2f}" if "fid" in r else ""))
    print("per latent dimension: mean, std of q(z) (the prior's: 0, 1), E_x KL(q(z_j|x) || p(z_j)):\n" + "\n".join(
        "  " + " ".join(f"{v:5.2f}" for v in r[key]) for key in ("posterior_mean", "posterior_std", "kl_per_dim")))
    print(f"the test KL {r['test_kl']:.2f} = I(x; z) {r['mutual_information']:.2f} + KL(q(z) || p(z)) "
          f"{r['test_kl'] - r['mutual_information']:.2f} nats (Hoffman & Johnson 2016)")

# -----------------------------------------------------------------------------
# the command line: an option for each field of Config, and where the files go

PRESETS = {
    # Burda, Grosse & Salakhutdinov 2015 (IWAE), Table 1, one stochastic layer: tanh MLP 784-200-200-50, batch 20,
    # Adam (0.9, 0.999, eps 1e-4), 3^i epochs at lr 1e-3 * 10^(-i/7), i = 0..7, test NLL with K = 5000. Their eps
    # acts on the batch *sum*, ours on the mean, whose gradients are 20x smaller: eps 1e-4 / 20 is the same optimizer.
    "iwae": dict(arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh", batch_size=20,
                 lr=1e-3, lr_schedule="iwae", adam_eps=1e-4 / 20, epochs=3280, eval_samples=5000),
}


def parse_args(argv=None):
    p = Parser(description="Train and evaluate a VAE on MNIST; numbers are nats per test image.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published setup; flags given explicitly still win")
    kinds = {"lr": positive_float, "adam_eps": positive_float, "seed": seed, "fid_samples": _number(int, 2, True),
             "hidden": positive_int, int: positive_int, float: nonnegative_float}
    for f in dataclasses.fields(Config):
        kind = {"action": "store_true"} if f.type is bool else {"type": kinds.get(f.name, kinds.get(f.type, str))}
        p.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata, **kind)
    p.add_argument("--data-dir", default="./data", help="MNIST lives in DATA_DIR/MNIST/raw (downloaded if missing)")
    p.add_argument("--out", help="the run's folder (default runs/vae; with --eval-only, the checkpoint's folder)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    p.add_argument("--resume", action="store_true", help="continue OUT/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="a new run may replace the files of another run in OUT")
    p.add_argument("--eval-only", action="store_true", help="evaluate --ckpt without training")
    p.add_argument("--ckpt", help="the checkpoint --eval-only evaluates (default OUT/ckpt.pt)")
    p.add_argument("--fid", action="store_true", help="also compute FID (needs torchvision's Inception-v3 weights)")
    p.set_defaults(**PRESETS.get(p.parse_known_args(argv)[0].preset, {}))  # explicit flags still win
    cfg = p.parse_args(argv)
    if cfg.capacity is not None and cfg.beta != 1.0:
        raise UserError("--capacity and --beta are two different objectives: pass one of them")
    if cfg.train_samples > 1 and (cfg.capacity is not None or cfg.beta != 1.0):
        raise UserError("--train-samples K > 1 trains the importance-weighted bound: it has no beta or capacity form")
    if cfg.ckpt and not cfg.eval_only:
        raise UserError("--ckpt is the checkpoint that --eval-only evaluates; a run's own is OUT/ckpt.pt")
    cfg.out = cfg.out or (os.path.dirname(cfg.ckpt) or "." if cfg.ckpt else os.path.join("runs", "vae"))
    cfg.ckpt, cfg.hidden = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt"), list(cfg.hidden)
    return cfg


def main(argv=None):
    try:
        return run(parse_args(argv))
    except (UserError, OSError) as e:  # what a user can cause: a mistake, a file
        print(f"vae.py: error: {f'{e.strerror}: {e.filename}' if isinstance(e, OSError) and e.filename else e}",
              file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("vae.py: interrupted; the checkpoint of the last finished epoch is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        while LOCKS:  # (main may be called from Python: the run's folder is let go)
            os.close(LOCKS.pop())


# =============================================================================
# Shared with kl_autoencoder.py: each file stands alone, so these are written in both; a test keeps them identical.
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


def append_jsonl(path, record):
    """One JSON line at the end of path."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path):
    """The records of path's whole lines: an unfinished last line (kill -9 mid-write) is left out."""
    text = pathlib.Path(path).read_text() if os.path.exists(path) else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


if __name__ == "__main__":
    main()
