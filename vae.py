"""
A variational autoencoder on MNIST, in one file, to be read top to bottom.

    python vae.py --device cuda          # train, evaluate (nats per test image), draw pictures
    python vae.py --eval-only --eval-samples 5000     # the literature's NLL protocol on runs/vae/ckpt.pt
    python vae.py --preset iwae          # Burda et al. 2015, Table 1, one stochastic layer
    python vae.py --help                 # every option

The model (Kingma & Welling 2014): an encoder q(z|x) = N(mu(x), diag exp(logvar(x))), a prior
p(z) = N(0, I) and a decoder p(x|z), by default a product of Bernoullis on dynamically binarized
pixels, so that every reported number is a log-likelihood in nats per test image, comparable with
the literature (Burda et al. 2015, Table 1). Training maximises the evidence lower bound (ELBO), or
the importance-weighted bound with --train-samples K, or the beta-VAE objectives (--beta,
--capacity). Evaluation reports the test -ELBO, the test negative log-likelihood estimated with
K importance samples, the active units, the aggregate posterior and, with --fid, a Frechet
Inception distance. Everything lands in --out: ckpt.pt, metrics.jsonl and four pictures.

The file:
    Part I, the VAE and its objective: model, the math, training, evaluation
    Part II, running it: data, pictures, checkpoints, the run, the command line, main; then the helpers
        shared with kl_autoencoder.py
"""

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import pathlib
import pickle
import signal
import sys
import tempfile
import time

try:
    import fcntl  # POSIX: a run's folder is locked (check_writable); not on Windows
except ImportError:
    fcntl = None

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision


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

    decode(z) gives, per pixel, Bernoulli logits (likelihood "bernoulli") or the mean of a Gaussian
    (likelihood "gaussian"). The Gaussian's variance is one learned scalar, exp(dec_logvar), shared
    by all pixels and trained with the rest (the calibrated decoder of Rybkin et al. 2021): a fixed
    variance of 1 would make the reconstruction term negligible against the KL, and the learned
    one settles at the mean squared error. Both decoders end in a per-pixel bias, `out_bias`,
    which init_output_bias() sets from the training data.

    arch "mlp": x -> MLP(hidden) -> (mu, logvar); z -> MLP(reversed hidden) -> 784.
    arch "conv": two stride-2 4x4 convolutions (28 -> 14 -> 7, 32 and 64 channels) then the MLP;
    the decoder mirrors it with transposed convolutions.
    """

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
    """Start the decoder at the mean training image: Bernoulli logit of the mean pixel, clipped
    to [0.001, 0.999] as in Burda et al.'s code, or the mean itself for the Gaussian."""
    p = x_train.mean(0)
    model.out_bias.copy_(torch.logit(p.clamp(1e-3, 1 - 1e-3)) if model.likelihood == "bernoulli" else p)

# -----------------------------------------------------------------------------
# the math: every formula of the paper, in nats

LOG_2PI = math.log(2 * math.pi)


def reparameterize(mu, logvar):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I): a sample of N(mu, diag exp(logvar)) that is
    differentiable in mu and logvar (Kingma & Welling 2014, section 2.4). Same shape as mu."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def gaussian_kl(mu, logvar):
    """KL(N(mu, diag exp(logvar)) || N(0, I)) = 1/2 sum_j (mu_j^2 + exp(logvar_j) - 1 - logvar_j)
    (Kingma & Welling 2014, appendix B), in nats, summed over the last (latent) dimension.
    exp(v) - 1 is computed as expm1(v), which keeps each term >= 0 in floating point near v = 0."""
    return 0.5 * (mu.pow(2) + torch.expm1(logvar) - logvar).sum(-1)


def log_bernoulli(x, logits):
    """log p(x | logits) = sum_d x_d log s(l_d) + (1 - x_d) log(1 - s(l_d)),  s = sigmoid,
    computed as sum_d x_d l_d + log s(-l_d) (since log s(l) - log s(-l) = l and 1 - s(l) = s(-l)),
    which is exact and finite for any logit. In nats, summed over the last (pixel) dimension."""
    return (x * logits + F.logsigmoid(-logits)).sum(-1)


def log_normal(x, mu, logvar):
    """log N(x; mu, diag exp(logvar)) = -1/2 sum_d (log 2 pi + logvar_d + (x_d - mu_d)^2 / exp(logvar_d)),
    in nats, summed over the last dimension (mu and logvar broadcast against x)."""
    return -0.5 * (LOG_2PI + logvar + (x - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def elbo(x, mu, logvar, log_likelihood):
    """ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || p(z)) <= log p(x), nats per example.

    q(z|x) = N(mu, diag exp(logvar)), p(z) = N(0, I). The expectation is estimated with one
    reparameterized sample, the KL is exact. `log_likelihood(x, z)` is any decoder's log p(x|z),
    summed over data dimensions. Returns (elbo, log p(x|z), KL), each of shape mu.shape[:-1]:
    the beta-VAE and capacity objectives weight the two terms differently.
    """
    z = reparameterize(mu, logvar)
    log_px_z = log_likelihood(x, z)
    kl = gaussian_kl(mu, logvar)
    return log_px_z - kl, log_px_z, kl


def iwae_bound(x, mu, logvar, log_likelihood, k):
    """L_K(x) = E[log (1/K) sum_k p(x, z_k) / q(z_k|x)], z_1..z_K ~ q(z|x) i.i.d. (Burda et al. 2015).

    One draw of the K samples; log-mean-exp = logsumexp_k(log w_k) - log K, in nats per example.
    L_1 is the ELBO, L_K grows with K and tends to log p(x). Shape mu.shape[:-1].
    """
    z = reparameterize(mu.expand(k, *mu.shape), logvar.expand(k, *logvar.shape))
    zero = z.new_zeros(())
    log_w = log_likelihood(x, z) + log_normal(z, zero, zero) - log_normal(z, mu, logvar)
    return torch.logsumexp(log_w, dim=0) - math.log(k)


def beta_vae_loss(log_px_z, kl, beta):
    """Higgins et al. 2017: -log p(x|z) + beta * KL, nats per example (both terms summed over
    their dimensions, so beta = 1 is the negative ELBO; a paper that averages the reconstruction
    over the 784 pixels instead and weights the summed KL by b has beta = 784 * b here)."""
    return -log_px_z + beta * kl


def capacity_loss(log_px_z, kl, gamma, capacity):
    """Burgess et al. 2018: -log p(x|z) + gamma * |KL - C|, nats per example, with C in nats."""
    return -log_px_z + gamma * (kl - capacity).abs()


def capacity_at(step, c_max, iters):
    """C = C_max * min(1, step / iters): rises linearly from 0 and stays at C_max after `iters` steps."""
    return c_max * min(1.0, step / iters)

# -----------------------------------------------------------------------------
# training

def prepare(x, likelihood, generator=None):
    """Turn intensities in [0, 1] into what the likelihood models, with fresh noise on every call.

    bernoulli: dynamic binarization, x ~ Bernoulli(intensity) (Burda et al. 2015).
    gaussian: uniform dequantization, x = (255 * intensity + u) / 256, u ~ U[0, 1) (Theis et al.
    2016). A density p on [0, 1]^784 then bounds the likelihood of the 8-bit images only after a change of
    units: log P(image) >= E_u[log p(x)] - 784 ln 256, i.e. add 784 ln 256 = 4347.4 nats to its NLL.
    """
    if likelihood == "bernoulli":
        return torch.bernoulli(x, generator=generator)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (x * 255 + u) / 256


def lr_at(epoch, cfg):
    """Learning rate for 0-based `epoch`: constant, cosine from lr towards 0 over the run, or the
    IWAE stages (3^i epochs at lr * 10^(-i/7), i = 0, 1, ..., staying in the last one reached)."""
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
    """What one training step needs, per example: (log p(x|z), KL) for the ELBO family (k = 1),
    or (L_K, KL) for the importance-weighted bound (k > 1; the KL is then only logged)."""
    mu, logvar = model.encode(x)
    if k > 1:
        return iwae_bound(x, mu, logvar, model.log_likelihood, k=k), gaussian_kl(mu, logvar)
    _, log_px_z, kl = elbo(x, mu, logvar, model.log_likelihood)
    return log_px_z, kl


def train_epoch(model, opt, x_train, cfg, epoch, terms_fn=train_terms):
    """One pass over a fresh permutation of the training set. Batches are slices of one tensor on
    the device; nothing leaves the device until the sums are read at the end.
    Returns the means of the training loss, of the bound (-ELBO, or -L_K when K > 1) and of
    the KL, in nats per example."""
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
    the caller to log, checkpoint, or stop on a NaN. cfg: the command line's options, e.g. parse_args([]) (Part II)."""
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


@torch.no_grad()
def test_nll(model, x_test, k, rows=2 ** 16, progress=None):
    """-log p(x) estimated by -L_K with K importance samples, nats per example (an upper bound on
    the NLL that tightens as K grows; Burda et al. use K = 5000). The K samples are drawn in
    chunks of at most `rows` decoder evaluations and combined exactly:
    log (1/K) sum_k w_k = logsumexp_c(L_{K_c} + log K_c) - log K over chunks c of K_c samples.
    progress(n), if given, is told of every n images done."""
    model.eval()
    chunk = min(k, rows)
    total = torch.zeros((), dtype=torch.float64, device=x_test.device)

    def log_likelihood(x, z):  # on the CPU 64 samples at a time: small buffers that stay in the cache (2x faster)
        return torch.cat([model.log_likelihood(x, part) for part in z.split(64 if z.device.type == "cpu" else len(z))])
    for x in x_test.split(max(1, rows // chunk)):
        mu, logvar = model.encode(x)
        sizes = [min(chunk, k - start) for start in range(0, k, chunk)]
        parts = [iwae_bound(x, mu, logvar, log_likelihood, k=size) + math.log(size) for size in sizes]
        total -= (torch.logsumexp(torch.stack(parts), 0) - math.log(k)).double().sum()
        if progress is not None:
            progress(len(x))
    return total.item() / len(x_test)


@torch.no_grad()
def posterior_means(model, x, batch_size=2000):
    """mu(x) and logvar(x) of q(z|x) for every row of x."""
    model.eval()
    mus, logvars = zip(*(model.encode(b) for b in x.split(batch_size)))
    return torch.cat(mus), torch.cat(logvars)


def active_units(mu, threshold=0.01):
    """Burda et al. 2015: latent dimension i is active when Cov_x(E_q(z|x)[z_i]) > 0.01,
    the variance over the data of the posterior mean. mu: (N, latent_dim)."""
    return int((mu.var(0) > threshold).sum())


def aggregate_posterior(mu, logvar):
    """Mean and std per dimension of q(z) = (1/N) sum_n q(z|x_n): E[z] = mean_n mu_n and
    Var[z] = mean_n exp(logvar_n) + Var_n(mu_n) (law of total variance). For p(z) they are 0 and 1."""
    return mu.mean(0), (logvar.exp().mean(0) + mu.var(0, correction=0)).sqrt()


def kl_per_dimension(mu, logvar):
    """KL(q(z_j|x) || N(0, 1)) for each latent dimension j, in nats, averaged over the rows (images) of mu: shape
    (latent_dim,). Prior and posterior both factorise over dimensions, so the KLs sum to the ELBO's KL; a dimension
    with KL near 0 carries no information about x (its posterior is the prior)."""
    return gaussian_kl(mu.unsqueeze(-1), logvar.unsqueeze(-1)).mean(0)


@torch.no_grad()
def mutual_information(mu, logvar, rows=2 ** 24):
    """I(x; z) in nats under q(x, z) = p(x) q(z|x), p(x) the N rows' empirical distribution. Hoffman & Johnson (2016)
    split the ELBO's KL: E_x KL(q(z|x) || p(z)) = I(x; z) + KL(q(z) || p(z)), q(z) = (1/N) sum_n q(z|x_n). Estimated as
    I = mean_n [log q(z_n|x_n) - log q(z_n)], one z_n ~ q(z|x_n) per row, with log q(z_n) the exact log of the mixture
    of all N posteriors (logsumexp_m log q(z_n|x_m) - log N; evaluated `rows` densities at a time). Unbiased for the
    empirical p(x), with the Monte Carlo error of a mean of N terms. As the MI of the true data distribution it is
    biased low: it cannot exceed log N (9.2 nats for 10,000 images), which it nears when posteriors barely overlap."""
    z = reparameterize(mu, logvar)
    chunk = max(1, rows // (len(mu) * mu.shape[1]))
    log_q_z = torch.cat([torch.logsumexp(log_normal(part[:, None], mu, logvar), dim=1) for part in z.split(chunk)])
    return (log_normal(z, mu, logvar) - (log_q_z - math.log(len(mu)))).mean().item()


def normal_qq(z):
    """The points of a normal Q-Q plot of each column of z (N, D): the standard normal's quantiles at the probabilities
    (i + 1/2) / N, i = 0..N-1, shape (N,), against each column sorted, (N, D). Samples of N(0, 1) lie near the line
    y = x (the i-th of N sorted samples has standard error sqrt(p(1-p) / N) / phi(q_p) about q_p, p = (i + 1/2) / N)."""
    p = (torch.arange(len(z), dtype=z.dtype, device=z.device) + 0.5) / len(z)
    return torch.special.ndtri(p), z.sort(0).values


# A deliberate copy of kl_autoencoder.py's (each file stands alone); a test keeps the two identical.
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
def fid(model, x_test, n, features):
    """FID between n decoded prior samples E[x|z], z ~ N(0, I), and n test images (grey levels), with
    `features` the feature network (images (N, 784) in [0, 1] -> (N, D)): torchvision's Inception
    in run(), which makes it comparable between runs of this code, not with pytorch-fid."""
    model.eval()
    z = torch.randn(n, model.latent_dim, device=x_test.device)
    fake = torch.cat([model.mean(b) for b in z.split(1000)])
    stats = []
    for images in (fake, x_test[:n]):
        f = features(images)
        stats += [f.mean(0), torch.cov(f.T)]
    return frechet_distance(*stats)


def evaluate(model, x_test_grey, x_test, cfg, features=None, progress=None):
    """The final record: test -ELBO, test NLL (K = eval_samples), active units, aggregate posterior, KL per latent
    dimension, mutual information I(x; z), and FID when a feature network is given. Seeded, so the same checkpoint
    always gives the same numbers, at the end of training and with --eval-only. progress: see test_nll."""
    torch.manual_seed(TEST_SEED)
    nelbo, kl = test_elbo(model, x_test)
    t0 = time.time()
    nll = test_nll(model, x_test, cfg.eval_samples, progress=progress)
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
# PART II: running it: data, pictures, checkpoints, the run, the command line
# =============================================================================

# -----------------------------------------------------------------------------
# data

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_mnist(data_dir, device):
    """Both splits of MNIST as float tensors (N, 784) of intensities in [0, 1], on `device`: read once through
    torchvision from DATA_DIR/MNIST/raw (downloaded there when missing; gzipped IDX files put there by hand are
    unpacked first), so that training batches are taken by indexing, with no DataLoader or per-image transform."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    for path in (os.path.join(raw, name) for name in MNIST_FILES):
        if not os.path.exists(path) and os.path.exists(path + ".gz"):
            try:
                with gzip.open(path + ".gz") as f:
                    data = f.read()
            except (OSError, EOFError) as e:  # not gzip (BadGzipFile is an OSError), or truncated
                raise UserError(f"{path}.gz is not a complete gzip file ({type(e).__name__}): download it again")
            write_atomically(path, data)
    download = not all(os.path.exists(os.path.join(raw, name)) for name in MNIST_FILES)
    if download:
        print(f"downloading MNIST into {raw}")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            splits = [torchvision.datasets.MNIST(data_dir, train=train, download=download).data
                      for train in (True, False)]
    except (AssertionError, RuntimeError, OSError, ValueError, IndexError, TypeError) as e:  # no network, bad files
        reason = "wrong magic number" if isinstance(e, AssertionError) else (str(e).strip() or type(e).__name__)
        raise UserError(f"could not read MNIST ({reason.splitlines()[0]}); put the four original IDX files "
                        f"({', '.join(MNIST_FILES)}, gzipped or not) into {raw}, or pass --data-dir")
    return [s.reshape(len(s), -1).to(device=device, dtype=torch.float32) / 255 for s in splits]


def prepare_test_set(x_test, likelihood):
    """The test set, binarized (or dequantized) once with a fixed seed: the same on every run and device."""
    return prepare(x_test.cpu(), likelihood, torch.Generator().manual_seed(TEST_SEED)).to(x_test.device)


@torch.no_grad()
def inception_features(net, images, batch_size=200):
    """FID's features: images (N, 784) in [0, 1] -> (N, 2048) float64, grey repeated to RGB, resized bilinearly to
    299 x 299 and normalised with ImageNet's mean and std (torchvision's Inception-v3 weights expect it)."""
    mean = torch.tensor([0.485, 0.456, 0.406], device=images.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=images.device).view(1, 3, 1, 1)
    feats = []
    for x in images.split(batch_size):
        x = F.interpolate(x.view(-1, 1, 28, 28).expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear",
                          align_corners=False)
        feats.append(net((x - mean) / std).double())
    return torch.cat(feats)

# -----------------------------------------------------------------------------
# pictures

PICTURES = ("samples.png", "reconstructions.png", "interpolations.png", "latent_qq.png", "manifold.png")


def save_grid(images, path, nrow):
    """(N, 784) in [0, 1] -> one PNG grid, atomically."""
    grid = torchvision.utils.make_grid(images.detach().float().view(-1, 1, 28, 28).clamp(0, 1).cpu(), nrow=nrow,
                                       padding=2, pad_value=1)
    write_atomically(path, torchvision.io.encode_png((grid[:1] * 255).round().to(torch.uint8)).numpy())


def save_qq(z, path, size=64, lim=4.0):
    """latent_qq.png: a normal Q-Q plot per latent dimension (the first 64, 8 to a row), each a panel of size x size
    pixels over [-lim, lim]^2: the N sorted samples of the column (black) against the standard normal's quantiles,
    and the line y = x (grey). A dimension distributed as the prior lies on the line; a shifted one lies beside it,
    a narrow one flatter, a wide one steeper; points beyond lim stay at the panel's edge."""
    q, sorted_z = normal_qq(z[:, :64].double().cpu())
    pixel = lambda v: ((v + lim) / (2 * lim) * (size - 1)).round().clamp(0, size - 1).long()  # noqa: E731
    panels, line = torch.ones(sorted_z.shape[1], size, size), torch.arange(size)
    panels[:, size - 1 - line, line] = 0.6
    panels[torch.arange(sorted_z.shape[1]), size - 1 - pixel(sorted_z), pixel(q)[:, None]] = 0.0
    grid = torchvision.utils.make_grid(panels[:, None], nrow=8, padding=2, pad_value=0.8)
    write_atomically(path, torchvision.io.encode_png((grid[:1] * 255).round().to(torch.uint8)).numpy())


@torch.no_grad()
def save_pictures(model, x_test, out):
    """samples.png (64 prior samples), reconstructions.png (test inputs above their reconstructions),
    interpolations.png (straight lines between posterior means of test pairs), latent_qq.png (one sample of
    q(z|x) per test image: the aggregate posterior against the prior) and, for 2 latents, manifold.png
    (Kingma & Welling 2014, figure 4)."""
    model.eval()
    torch.manual_seed(TEST_SEED)
    save_grid(model.mean(torch.randn(64, model.latent_dim, device=x_test.device)), os.path.join(out, PICTURES[0]), 8)
    x = x_test[:32]
    mu, _ = model.encode(x)
    save_grid(torch.cat([x[:16], model.mean(mu[:16]), x[16:], model.mean(mu[16:])]), os.path.join(out, PICTURES[1]), 16)
    a, b = mu[:8], mu[8:16]
    t = torch.linspace(0, 1, 10, device=mu.device).view(1, 10, 1)
    save_grid(model.mean(a[:, None] + t * (b - a)[:, None]).reshape(-1, 784), os.path.join(out, PICTURES[2]), 10)
    if model.latent_dim == 2:
        q = torch.special.ndtri(torch.linspace(0.05, 0.95, 20, device=mu.device))
        grid = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), -1).reshape(-1, 2)
        save_grid(model.mean(grid), os.path.join(out, PICTURES[4]), 20)
    save_qq(reparameterize(*posterior_means(model, x_test)), os.path.join(out, PICTURES[3]))

# -----------------------------------------------------------------------------
# checkpoints and the run

MODEL_KEYS = ("arch", "hidden", "latent_dim", "activation", "likelihood")  # what a checkpoint fixes
PROGRAM, CHECKPOINT_KEYS = "vae.py", {"model", "config", "epoch"}  # what load_checkpoint expects


# A deliberate copy of kl_autoencoder.py's (each file stands alone); a test keeps the two identical.
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


def save_checkpoint(path, model, opt, cfg, epoch):
    """Everything needed to continue exactly: weights, optimizer, config, epoch, random states."""
    buffer = io.BytesIO()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "config": vars(cfg), "epoch": epoch,
                "rng": {"cpu": torch.get_rng_state(), "cuda": cuda}}, buffer)
    write_atomically(path, buffer.getbuffer())


def run(cfg):
    """Train (unless --eval-only), evaluate and draw the pictures; everything lands in --out."""
    device = get_device(cfg.device)
    ckpt = open_run(cfg, device)
    inception = load_inception(device) if cfg.fid else None  # fail before training, not after it
    x_train, x_test_grey = load_mnist(cfg.data_dir, device)
    if cfg.batch_size > len(x_train):
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the training set ({len(x_train)} images)")
    x_test, metrics = prepare_test_set(x_test_grey, cfg.likelihood), os.path.join(cfg.out, "metrics.jsonl")
    torch.manual_seed(cfg.seed)
    try:  # the model of this run, or of the checkpoint (one of another vae.py: one line, not a traceback)
        sizes = {key: (ckpt["config"] if ckpt else vars(cfg))[key] for key in MODEL_KEYS}
        with torch.device("meta"):  # counted without the memory: weights, gradients and Adam's two moments
            n = sum(p.numel() for p in VAE(**sizes).parameters())
        check_memory(16 * n, f"--hidden {' '.join(map(str, sizes['hidden']))}: a model of {n:,} parameters",
                     torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None)
        model = VAE(**sizes).to(device)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{cfg.ckpt} does not hold a model vae.py can build ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0]})")
    if ckpt is None:
        init_output_bias(model, x_train)
        open(metrics, "w").close()
    print(f"{cfg.arch} VAE, {sum(p.numel() for p in model.parameters()):,} parameters, {cfg.likelihood} likelihood, "
          f"on {device}")
    epoch = ckpt["epoch"] if ckpt else 0
    if not cfg.eval_only:
        epoch = train_and_log(model, ckpt, x_train, x_test, cfg=cfg, metrics=metrics)
    features = (lambda images: inception_features(inception, images)) if inception is not None else None
    record = {**evaluate(model, x_test_grey, x_test, cfg, features=features,
                         progress=Progress(f"test NLL (K={cfg.eval_samples})", len(x_test)).update), "epoch": epoch}
    append_jsonl(metrics, record)
    save_pictures(model, x_test, cfg.out)
    report(record, cfg)
    return record


def open_run(cfg, device):
    """The checkpoint to evaluate or resume (None for a new run), after checking the options against it: a new run
    (or outputs away from the checkpoint's folder) never writes over another run's files without --overwrite."""
    if cfg.amp and device.type != "cuda":
        raise UserError("--amp (bf16 autocast) is for --device cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if os.path.isdir(cfg.ckpt):
        raise UserError(f"--ckpt {cfg.ckpt} is a folder: give the checkpoint's file name, e.g. {cfg.ckpt}/ckpt.pt")
    ckpt = load_checkpoint(cfg.ckpt) if cfg.eval_only or cfg.resume else None
    if ckpt is None and os.path.exists(cfg.ckpt) and not cfg.overwrite:
        raise UserError(f"{cfg.ckpt} exists: pass --resume to continue it, another --out for a new run, or --overwrite")
    run_out = ckpt["config"].get("out") if ckpt else None  # its run's folder: the run continues there, all of it
    ours = os.path.abspath(cfg.out) == os.path.abspath(os.path.dirname(cfg.ckpt)) and (  # the checkpoint's own
        ckpt is None or os.path.basename(ckpt["config"].get("ckpt") or "") == os.path.basename(cfg.ckpt)  # folder, not
        or os.path.abspath(run_out or "") == os.path.abspath(cfg.out))  # a copy from another run's (a backup is ours)
    if cfg.resume and not ours and os.path.abspath(cfg.out) != os.path.abspath(run_out or os.path.dirname(cfg.ckpt)):
        raise UserError(f"{cfg.ckpt} belongs to the run in {run_out}: resume it with --out {run_out} (a resumed run "
                        f"keeps its files together), or pass --eval-only to evaluate it elsewhere")
    for name in ("metrics.jsonl", *PICTURES):
        if (ckpt is None or not ours) and not cfg.overwrite and os.path.exists(os.path.join(cfg.out, name)):
            raise UserError(f"{cfg.out} holds another run's {name}: pass another --out, or --overwrite")
    check_writable(cfg.out)
    if not cfg.eval_only:  # where the checkpoints go, when not in --out: made before any work too
        os.makedirs(os.path.dirname(os.path.abspath(cfg.ckpt)), exist_ok=True)
    mismatch = [k for k in MODEL_KEYS if ckpt and not cfg.eval_only and ckpt["config"].get(k) != getattr(cfg, k)]
    if mismatch:
        given = ", ".join(f"--{k.replace('_', '-')} {ckpt['config'].get(k)}" for k in mismatch)
        raise UserError(f"{cfg.ckpt} was trained with {given}: pass the same options to --resume it, or another --out "
                        f"for a new run")
    if cfg.eval_only:  # the checkpoint decides the model
        vars(cfg).update({key: ckpt["config"].get(key) for key in MODEL_KEYS})
    return ckpt


def train_and_log(model, ckpt, x_train, x_test, cfg, metrics):
    """train() from the checkpoint's epoch (and optimizer and random state) or the first: after each epoch a log
    line, a line in metrics.jsonl and a checkpoint. Returns the number of finished epochs."""
    epoch, opt_state = (ckpt["epoch"], ckpt["optimizer"]) if ckpt else (0, None)
    if ckpt is not None:
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if x_train.device.type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        kept = [r for r in read_jsonl(metrics, "epoch") if r["epoch"] < epoch or r["epoch"] == epoch
                and r["kind"] == "epoch"]
        write_atomically(metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())  # the rest is made again
        print(f"resuming {cfg.ckpt} after epoch {epoch}")
    label = "-ELBO" if cfg.train_samples == 1 else f"-L_{cfg.train_samples}"  # train_bound in metrics.jsonl
    for r, opt in train(model, x_train, x_test, cfg, first_epoch=epoch, opt_state=opt_state):
        if not math.isfinite(r["train_loss"]):
            kept = f"{cfg.ckpt} holds the last good epoch, {r['epoch'] - 1}" if r["epoch"] > 1 else "no checkpoint yet"
            raise UserError(f"the training loss became {r['train_loss']} in epoch {r['epoch']} ({kept}): "
                            f"try a lower --lr")
        append_jsonl(metrics, r)
        save_checkpoint(cfg.ckpt, model, opt, cfg=cfg, epoch=r["epoch"])  # after the log line: resumes drop later ones
        print(f"epoch {r['epoch']:4d}/{cfg.epochs} | train {label} {r['train_bound']:7.2f} | test -ELBO "
              f"{r['test_nelbo']:7.2f} | KL {r['test_kl']:6.2f} | {r['seconds']:6.2f} s | "
              f"{r['images_per_s']:9,.0f} img/s", flush=True)
    return max(epoch, cfg.epochs)


# A deliberate copy of kl_autoencoder.py's (each file stands alone); a test keeps the two identical.
def append_jsonl(path, record):
    """One JSON line at the end of path, after cutting off an unfinished last line (a full disk, kill -9 mid-write)."""
    with open(path, "a+b") as f:  # (writes go to the end, wherever it reads)
        end = f.seek(0, os.SEEK_END)
        f.seek(max(0, end - 1))
        if end and f.read(1) != b"\n":  # rare: read it all to find the last whole line
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)
        f.write((json.dumps(record) + "\n").encode())


# A deliberate copy of kl_autoencoder.py's (each file stands alone); a test keeps the two identical.
def read_jsonl(path, key):
    """The records of path's whole lines: an unfinished last line (a full disk, kill -9 mid-write), and lines that are
    no JSON object with a "kind" and a number under `key` (edited by hand, say), are left out."""
    text = pathlib.Path(path).read_text(errors="replace") if os.path.exists(path) else ""
    records = []
    for line in text[:text.rfind("\n") + 1].splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict) and "kind" in r and isinstance(r.get(key), (int, float))]


def report(record, cfg):
    """The final record, printed."""
    fid_text = f" | FID {record['fid']:.2f} (torchvision Inception)" if "fid" in record else ""
    print(f"test -ELBO {record['test_nelbo']:.2f} | test NLL (K={cfg.eval_samples}) {record['test_nll']:.2f} nats | "
          f"active units {record['active_units']}/{record['latent_dim']}{fid_text}")
    print("per latent dimension: the mean and std of q(z) (the prior's: 0 and 1), and E_x KL(q(z_j|x) || p(z_j)):")
    print("  mean " + " ".join(f"{m:+.2f}" for m in record["posterior_mean"]))
    print("  std  " + " ".join(f"{s:5.2f}" for s in record["posterior_std"]))
    print("  KL   " + " ".join(f"{k:5.2f}" for k in record["kl_per_dim"]))
    mi = record["mutual_information"]
    print(f"the test KL {record['test_kl']:.2f} = mutual information I(x; z) {mi:.2f} + KL(q(z) || p(z)) "
          f"{record['test_kl'] - mi:.2f} nats")
    print(f"wrote {cfg.out}/: metrics.jsonl, {', '.join(PICTURES[:4 + (record['latent_dim'] == 2)])}"
          + ("" if cfg.eval_only else f"; the checkpoint: {cfg.ckpt}"))

# -----------------------------------------------------------------------------
# the command line

PRESETS = {
    # Burda, Grosse & Salakhutdinov 2015 (IWAE), Table 1, one stochastic layer: tanh MLP 784-200-200-50, the
    # decoder's output bias at the logit of the mean pixel, batch 20, Adam (beta1 0.9, beta2 0.999, eps 1e-4),
    # 3^i epochs at lr 1e-3 * 10^(-i/7), i = 0..7 (3,280 in all), dynamic binarization, test NLL with K = 5000.
    # Their eps acts on the batch *sum*; ours on the mean, whose gradients are 20x smaller, and Adam depends on
    # the loss's scale only through eps: 1e-4 / 20 = 5e-6 is the same optimizer. Where we differ from their
    # released code (yburda/iwae): its Adam has beta1 0.99 and starts the second moment at ones (we: the
    # paper's 0.9, PyTorch's zeros); it trains on 59,600 images and keeps 400 for validation (we: all 60,000);
    # it re-binarizes the test set at every evaluation (we: once, with a fixed seed, the same every run).
    "iwae": dict(arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh", batch_size=20,
                 lr=1e-3, lr_schedule="iwae", adam_eps=1e-4 / 20, epochs=3280, eval_samples=5000),
}


def parse_args(argv=None):
    p = Parser(description="Train and evaluate a VAE on MNIST; numbers are nats per test image.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published setup; flags given explicitly still win")
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data-dir", default="./data", help="MNIST lives in DATA_DIR/MNIST/raw (downloaded if missing)")
    g.add_argument("--out", default=None, help="run folder for ckpt.pt, metrics.jsonl, pictures (default runs/vae; "
                                               "with --eval-only, the checkpoint's folder)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto: cuda, mps, cpu")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="mlp", choices=["mlp", "conv"], help="mlp, or convolutions (decoder: transposed)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[512, 512],
                   help="hidden layer widths of the encoder MLP (the decoder mirrors them)")
    g.add_argument("--latent-dim", type=positive_int, default=32)
    g.add_argument("--activation", default="elu", choices=["relu", "tanh", "elu"])
    g.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"],
                   help="bernoulli: dynamically binarized pixels; gaussian: dequantized grey levels, learned variance")
    g = p.add_argument_group("objective")
    g.add_argument("--beta", type=nonnegative_float, default=1.0,
                   help="beta-VAE (Higgins et al. 2017): -log p(x|z) + beta * KL")
    g.add_argument("--capacity", type=nonnegative_float, default=None, metavar="C_MAX",
                   help="Burgess et al. 2018: -log p(x|z) + gamma * |KL - C|, C rising linearly to C_MAX nats")
    g.add_argument("--capacity-iters", type=positive_int, default=100_000, help="steps for C to reach C_MAX")
    g.add_argument("--gamma", type=nonnegative_float, default=1000.0, help="weight of |KL - C|")
    g.add_argument("--train-samples", type=positive_int, default=1,
                   help="K of the importance-weighted bound trained on (1: the ELBO)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=100)
    g.add_argument("--batch-size", type=positive_int, default=128)
    g.add_argument("--lr", type=positive_float, default=1e-3)
    g.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine", "iwae"],
                   help="per epoch; iwae: stages i = 0.. of 3^i epochs at lr * 10^(-i/7)")
    g.add_argument("--adam-eps", type=positive_float, default=1e-8)
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--amp", action="store_true", help="bf16 autocast for the networks on CUDA (the math stays float32)")
    g.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    g.add_argument("--overwrite", action="store_true", help="a new run may replace the files of another run in OUT")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-only", action="store_true", help="evaluate --ckpt without training")
    g.add_argument("--ckpt", default=None, help="checkpoint to evaluate or resume (default OUT/ckpt.pt)")
    g.add_argument("--eval-samples", type=positive_int, default=1000,
                   help="K of the importance-sampled test NLL (the literature uses 5000)")
    g.add_argument("--fid", action="store_true", help="also compute FID (needs torchvision's Inception-v3 weights)")
    g.add_argument("--fid-samples", type=_number(int, 2, True), default=10_000,
                   help="prior samples for FID, against as many test images")
    preset = p.parse_known_args(argv)[0].preset  # a preset changes the defaults, explicit flags still win
    p.set_defaults(**PRESETS.get(preset, {}))
    return settle(p.parse_args(argv))


def settle(cfg):
    """The one place where options are checked together and defaults that depend on others are settled."""
    if cfg.capacity is not None and cfg.beta != 1.0:
        raise UserError("--capacity and --beta are two different objectives: pass one of them")
    if cfg.train_samples > 1 and (cfg.capacity is not None or cfg.beta != 1.0):
        raise UserError("--train-samples K > 1 trains the importance-weighted bound, which has no beta or capacity "
                        "form: drop one")
    if cfg.out is None:
        cfg.out = (os.path.dirname(cfg.ckpt) or ".") if cfg.eval_only and cfg.ckpt else os.path.join("runs", "vae")
    cfg.ckpt = cfg.ckpt or os.path.join(cfg.out, "ckpt.pt")
    return cfg


def main(argv=None):
    previous = signal.signal(signal.SIGTERM, interrupt)  # put back on the way out: main() may be called from Python
    try:
        return run(parse_args(argv))
    except (UserError, OSError) as e:  # what a user can cause: a mistake, a file
        print(f"vae.py: error: {f'{e.strerror}: {e.filename}' if isinstance(e, OSError) and e.filename else e}",
              file=sys.stderr)
        sys.exit(2)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # --compile where torch.compile cannot (no C++ compiler, say)
        inner = getattr(e, "inner_exception", e)
        print(f"vae.py: error: --compile: torch.compile failed ({type(inner).__name__}: "
              f"{(str(inner).strip() or '?').splitlines()[0]}); run without --compile", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("vae.py: interrupted; the checkpoint of the last finished epoch is kept", file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)  # None: not set from Python
        while LOCKED:
            os.close(LOCKED.popitem()[1])


# =============================================================================
# Shared with kl_autoencoder.py: each file stands alone, so these are written in both; a test keeps them identical.
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
