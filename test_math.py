"""Property tests of every hand-written formula: closed forms against Monte Carlo, bounds that must hold.

Each Monte Carlo check is seeded and allows 6 standard errors of its own estimate (a false alarm
about once in 500 million checks); hypothesis draws the inputs (derandomized in CI, see conftest.py).
References are computed independently here, in float64: torch.distributions, numpy, closed forms.
"""

import math
import os

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import example, given, settings
from hypothesis import strategies as st

import kl_autoencoder as kl
import vae

N = 200_000  # Monte Carlo samples per check
SE = 6  # allowed standard errors


@pytest.fixture(autouse=True, scope="module")
def float64():
    """The formulas are dtype-agnostic; these tests run them in float64 (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def t(values):
    return torch.tensor(values, dtype=torch.float64)


mus = st.floats(-3, 3)
logvars = st.floats(-4, 2)


def mu_logvar(max_dim=8):
    return st.integers(1, max_dim).flatmap(lambda d: st.tuples(
        st.tuples(*[mus] * d).map(t), st.tuples(*[logvars] * d).map(t)))


def assert_mc(samples, expected, what=""):
    """The mean of i.i.d. samples equals `expected` within SE standard errors."""
    mean, se = samples.mean().item(), samples.std().item() / math.sqrt(len(samples))
    assert abs(mean - expected) <= SE * se + 1e-12, f"{what}: Monte Carlo {mean:.6f} +- {se:.2e}, expected {expected:.6f}"


# ----------------------------------------------------------------------------- 1. KL to the prior

@given(mu_logvar())
@example((t([2.0, -1.0]), t([1.5, -3.0])))
@settings(max_examples=50)
def test_gaussian_kl_equals_monte_carlo(q):
    mu, logvar = q
    torch.manual_seed(0)
    eps = torch.randn(N, len(mu))
    z = mu + (0.5 * logvar).exp() * eps
    log_q = (-0.5 * (math.log(2 * math.pi) + logvar + eps ** 2)).sum(-1)
    log_p = (-0.5 * (math.log(2 * math.pi) + z ** 2)).sum(-1)
    assert_mc(log_q - log_p, vae.gaussian_kl(mu, logvar).item(), "KL")


@given(mu_logvar())
def test_gaussian_kl_is_nonnegative_and_zero_only_at_the_prior(q):
    mu, logvar = q
    kl = vae.gaussian_kl(mu, logvar).item()
    assert kl >= 0
    if mu.abs().max() > 1e-3 or logvar.abs().max() > 1e-3:
        assert kl > 0
    assert vae.gaussian_kl(torch.zeros_like(mu), torch.zeros_like(logvar)).item() == 0.0


@given(mu_logvar(4), mu_logvar(4))
def test_gaussian_kl_adds_over_independent_dimensions(a, b):
    joint = vae.gaussian_kl(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))
    assert torch.allclose(joint, vae.gaussian_kl(*a) + vae.gaussian_kl(*b), rtol=1e-12, atol=1e-12)


def test_gaussian_kl_keeps_batch_dimensions():
    mu, logvar = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert vae.gaussian_kl(mu, logvar).shape == (3, 5)

# ----------------------------------------------------------------------------- 2. reparameterization


@given(mus, logvars)
@example(1.0, 1.5)
@settings(max_examples=50)
def test_reparameterize_has_mean_mu_and_variance_exp_logvar(mu, logvar):
    torch.manual_seed(1)
    z = vae.reparameterize(torch.full((N,), mu), torch.full((N,), logvar))
    var = math.exp(logvar)
    assert_mc(z, mu, "mean")
    assert abs(z.var().item() - var) <= SE * var * math.sqrt(2 / (N - 1)), "variance"  # s.e. of a normal sample variance


@given(mus, logvars)
@example(1.0, 1.5)
@settings(max_examples=50)
def test_reparameterized_gradients_match_the_analytic_ones(mu, logvar):
    """E[z^2] = mu^2 + exp(logvar): d/dmu = 2 mu, d/dlogvar = exp(logvar). One leaf per sample, so
    the per-sample gradients give the Monte Carlo estimate and its standard error."""
    torch.manual_seed(2)
    mu_ = torch.full((N,), mu, requires_grad=True)
    logvar_ = torch.full((N,), logvar, requires_grad=True)
    vae.reparameterize(mu_, logvar_).pow(2).sum().backward()
    assert_mc(mu_.grad, 2 * mu, "d/dmu")
    assert_mc(logvar_.grad, math.exp(logvar), "d/dlogvar")

# ----------------------------------------------------------------------------- 3. likelihoods


@given(st.integers(1, 50).flatmap(lambda d: st.tuples(
    st.lists(st.floats(0, 1), min_size=d, max_size=d), st.lists(st.floats(-10, 10), min_size=d, max_size=d))))
@example(([1.0, 0.0, 0.3], [2.0, -5.0, 0.7]))
def test_log_bernoulli_equals_the_textbook_formula(xl):
    """In float64 with |l| <= 10, where 1 - s(l) >= 4.5e-5 keeps the textbook formula itself
    accurate to about 1e-16 / 4.5e-5 = 2e-12 per pixel."""
    x, logits = t(xl[0]), t(xl[1])
    p = torch.sigmoid(logits)
    expected = (x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum()
    assert torch.allclose(vae.log_bernoulli(x, logits), expected, rtol=1e-10, atol=1e-10)


@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0]), st.floats(-100, 100)), min_size=1, max_size=50))
@example([(1.0, -100.0), (0.0, 100.0), (1.0, 100.0), (0.0, -100.0)])
def test_log_bernoulli_is_finite_and_exact_for_large_logits_in_float32(pairs):
    x, logits = torch.tensor(pairs, dtype=torch.float32).T
    got = vae.log_bernoulli(x, logits)
    assert torch.isfinite(got)
    xs, ls = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    # log s(l) = -log(1 + e^-l), log(1 - s(l)) = -log(1 + e^l), in float64
    expected = (xs * -np.logaddexp(0, -ls) + (1 - xs) * -np.logaddexp(0, ls)).sum()
    assert abs(got.item() - expected) <= 1e-5 * max(1.0, abs(expected))  # float32 rounding


@given(st.integers(1, 20).flatmap(lambda d: st.tuples(*[st.lists(st.floats(lo, hi), min_size=d, max_size=d)
                                                        for lo, hi in [(-5, 5), (-5, 5), (-4, 3)]])))
def test_log_normal_equals_the_gaussian_density(xml):
    x, mu, logvar = (t(v) for v in xml)
    expected = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(x).sum()
    assert torch.allclose(vae.log_normal(x, mu, logvar), expected, rtol=1e-10, atol=1e-10)


def test_log_normal_broadcasts_a_shared_variance():
    x, mu = torch.randn(7, 5), torch.randn(7, 5)
    shared = vae.log_normal(x, mu, t(0.3))
    assert torch.allclose(shared, vae.log_normal(x, mu, torch.full((7, 5), 0.3)))

# ----------------------------------------------------------------------------- 4, 5. bounds in a linear Gaussian model


class LinearGaussian:
    """p(z) = N(0, I_d), p(x|z) = N(W z + b, s^2 I_D) with W = Q diag(c), Q orthonormal columns, so
    that log p(x) = log N(x; b, W W^T + s^2 I) and the exact posterior is a diagonal Gaussian:
    Cov = (I + W^T W / s^2)^-1 = diag(1 / (1 + c^2 / s^2)), mean = Cov W^T (x - b) / s^2."""

    def __init__(self, seed, d, extra):
        rng = np.random.default_rng(seed)
        D = d + extra
        q, _ = np.linalg.qr(rng.standard_normal((D, d)))
        self.c = t(rng.uniform(0.5, 3, d))
        self.W = t(q) * self.c
        self.b = t(rng.standard_normal(D))
        self.log_s2 = t(math.log(rng.uniform(0.1, 1)))
        self.x = t(rng.standard_normal(D)) * 2
        self.rng = rng

    def log_likelihood(self, x, z):
        return vae.log_normal(x, z @ self.W.T + self.b, self.log_s2)

    def log_px(self):
        cov = self.W @ self.W.T + self.log_s2.exp() * torch.eye(len(self.b))
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(self.x).item()

    def posterior(self):
        var = 1 / (1 + self.c ** 2 / self.log_s2.exp())
        return var * (self.W.T @ (self.x - self.b)) / self.log_s2.exp(), var.log()

    def some_q(self):
        """A q(z|x) near the posterior: means within one posterior std, variances within a factor e."""
        mu, logvar = self.posterior()
        return (mu + (0.5 * logvar).exp() * t(self.rng.uniform(-1, 1, len(mu))),
                logvar + t(self.rng.uniform(-1, 1, len(mu))))


models = st.builds(LinearGaussian, st.integers(0, 2 ** 32 - 1), st.integers(1, 4), st.integers(0, 4))


def replicate(q, n):
    return q[0].expand(n, -1), q[1].expand(n, -1)


@given(models)
@settings(max_examples=30)
def test_elbo_is_a_lower_bound_tight_at_the_posterior(m):
    torch.manual_seed(3)
    log_px = m.log_px()
    value = vae.elbo(m.x, *replicate(m.some_q(), N), m.log_likelihood)[0]
    mean, se = value.mean().item(), value.std().item() / math.sqrt(N)
    assert mean <= log_px + SE * se, "ELBO above log p(x)"
    assert_mc(vae.elbo(m.x, *replicate(m.posterior(), N), m.log_likelihood)[0], log_px, "ELBO at the exact posterior")


@given(models)
@settings(max_examples=20)
def test_elbo_terms_add_up(m):
    torch.manual_seed(4)
    q = replicate(m.some_q(), 10)
    value, log_px_z, kl = vae.elbo(m.x, *q, m.log_likelihood)
    assert torch.allclose(value, log_px_z - kl)
    assert torch.allclose(kl, vae.gaussian_kl(*q))


@given(models)
@settings(max_examples=20)
def test_iwae_bound_grows_with_k_towards_log_px(m):
    torch.manual_seed(5)
    log_px, q = m.log_px(), m.some_q()
    n = 5_000  # replicates of each bound
    bounds = {k: vae.iwae_bound(m.x, *replicate(q, n), m.log_likelihood, k) for k in (1, 5, 50)}
    elbo = vae.elbo(m.x, *replicate(q, n), m.log_likelihood)[0]
    stats = {k: (b.mean().item(), b.std().item() / math.sqrt(n)) for k, b in bounds.items()}
    # K = 1 is the ELBO in expectation (its KL estimated by sampling instead of in closed form)
    assert abs(stats[1][0] - elbo.mean().item()) <= SE * math.hypot(stats[1][1], elbo.std().item() / math.sqrt(n))
    for small, large in [(1, 5), (5, 50)]:  # non-decreasing in K
        assert stats[large][0] >= stats[small][0] - SE * math.hypot(stats[small][1], stats[large][1])
    for k, (mean, se) in stats.items():  # a lower bound on log p(x) for every K
        assert mean <= log_px + SE * se, f"L_{k} above log p(x)"
    # and it approaches it: for such q the gap at K = 50 is at most half the ELBO's (a scan of 400
    # random models found at most 0.27); dropping the log K, for one, breaks this and the bound above
    assert log_px - stats[50][0] <= (log_px - stats[1][0]) / 2 + SE * (stats[1][1] + stats[50][1])


def test_iwae_bound_is_exact_at_the_posterior():
    """With q the exact posterior every importance weight equals p(x): L_K = log p(x) for any K."""
    m = LinearGaussian(7, 3, 2)
    torch.manual_seed(6)
    for k in (1, 5):
        bound = vae.iwae_bound(m.x, *replicate(m.posterior(), 100), m.log_likelihood, k)
        assert torch.allclose(bound, torch.full_like(bound, m.log_px()), atol=1e-9)

# ----------------------------------------------------------------------------- 6. Frechet distance


def random_psd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


def reference_frechet(mu1, s1, mu2, s2):
    """float64 reference by another route: the eigenvalues of the non-symmetric product S1 S2
    (numpy's general eigensolver), which are real and non-negative, instead of a symmetric one."""
    ev = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(ev).sum())


seeds = st.integers(0, 2 ** 32 - 1)


@given(seeds, st.integers(1, 16), st.floats(0, 1e-2))
def test_frechet_distance_of_equal_covariances_is_the_squared_mean_distance(seed, d, shift):
    """Same covariance, means shift apart: d^2 = shift exactly (0 for identical statistics), checked on both sides,
    so that the clamp at 0 cannot hide a negative error. Tolerance: Tr(S S)^{1/2} goes through the square roots of
    the eigenvalues of S^2, computed to eps ||S||^2, so each root is off by up to sqrt(eps) ||S|| near zero: in all,
    2 d sqrt(eps) ||S|| (a case that failed a bound of 1e-9 Tr S, d = 6: an error of 1.9e-8; here 6.3e-7 allowed)."""
    rng = np.random.default_rng(seed)
    mu, sigma = rng.standard_normal(d), random_psd(rng, d)
    direction = rng.standard_normal(d)
    mu2 = mu + math.sqrt(shift) * direction / np.linalg.norm(direction)
    tolerance = 2 * d * math.sqrt(np.finfo(np.float64).eps) * np.linalg.norm(sigma, 2)
    for frechet_distance in (vae.frechet_distance, kl.frechet_distance):
        assert abs(frechet_distance(mu, sigma, mu2, sigma) - shift) <= tolerance


@given(seeds, st.integers(1, 16))
def test_frechet_distance_is_symmetric(seed, d):
    rng = np.random.default_rng(seed)
    a, b = (rng.standard_normal(d), random_psd(rng, d)), (rng.standard_normal(d), random_psd(rng, d))
    assert math.isclose(vae.frechet_distance(*a, *b), vae.frechet_distance(*b, *a), rel_tol=1e-9, abs_tol=1e-9)


@given(seeds, st.integers(1, 16))
def test_frechet_distance_of_diagonal_covariances(seed, d):
    rng = np.random.default_rng(seed)
    mu1, mu2, a, b = rng.standard_normal(d), rng.standard_normal(d), rng.uniform(0, 4, d), rng.uniform(0, 4, d)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert math.isclose(vae.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rel_tol=1e-9, abs_tol=1e-9)


@given(seeds, st.integers(2, 16))
def test_frechet_distance_is_invariant_to_a_common_rotation(seed, d):
    rng = np.random.default_rng(seed)
    mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), random_psd(rng, d), random_psd(rng, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rotated = vae.frechet_distance(q @ mu1, q @ s1 @ q.T, q @ mu2, q @ s2 @ q.T)
    assert math.isclose(rotated, vae.frechet_distance(mu1, s1, mu2, s2), rel_tol=1e-8, abs_tol=1e-8)


@given(seeds)
@settings(max_examples=25)
def test_frechet_distance_matches_a_float64_reference_in_64_dimensions(seed):
    rng = np.random.default_rng(seed)
    mu1, mu2, s1, s2 = rng.standard_normal(64), rng.standard_normal(64), random_psd(rng, 64), random_psd(rng, 64)
    expected = reference_frechet(mu1, s1, mu2, s2)
    assert abs(vae.frechet_distance(mu1, s1, mu2, s2) - expected) <= 1e-6 * expected


@given(seeds, st.integers(2, 40))
@settings(max_examples=25)
def test_frechet_distance_with_fewer_samples_than_dimensions(seed, n):
    """Covariances of n < 64 feature vectors are singular; the distance stays real, finite, >= 0."""
    rng = np.random.default_rng(seed)
    f1, f2 = rng.standard_normal((n, 64)), rng.standard_normal((n, 64)) + 0.1
    stats = [f1.mean(0), np.cov(f1.T), f2.mean(0), np.cov(f2.T)]
    d = vae.frechet_distance(*stats)
    assert math.isfinite(d) and d >= 0
    assert abs(d - reference_frechet(*stats)) <= 1e-6 * max(1.0, d)


def test_frechet_distance_accepts_torch_and_numpy():
    mu, sigma = torch.zeros(3), torch.eye(3)
    assert vae.frechet_distance(mu, sigma, np.ones(3), 4 * np.eye(3)) == pytest.approx(3 + 3 * (1 - 2) ** 2)

# ----------------------------------------------------------------------------- 7. beta-VAE and capacity objectives


finite = st.floats(-1e4, 1e4)


@given(finite, st.floats(0, 1e4), st.floats(0, 100))
def test_beta_vae_loss_is_its_formula(log_px_z, kl, beta):
    got = vae.beta_vae_loss(t(log_px_z), t(kl), beta).item()
    assert got == pytest.approx(-log_px_z + beta * kl, rel=1e-12, abs=1e-9)
    assert vae.beta_vae_loss(t(log_px_z), t(kl), 1.0).item() == pytest.approx(kl - log_px_z)  # -ELBO


@given(finite, st.floats(0, 1e4), st.floats(0, 1e4), st.floats(0, 100))
def test_capacity_loss_is_its_formula(log_px_z, kl, gamma, c):
    got = vae.capacity_loss(t(log_px_z), t(kl), gamma, c).item()
    assert got == pytest.approx(-log_px_z + gamma * abs(kl - c), rel=1e-12, abs=1e-6)


@given(st.floats(0, 100), st.integers(1, 10 ** 6), st.integers(0, 2 * 10 ** 6))
def test_capacity_rises_linearly_and_stops_at_c_max(c_max, iters, step):
    c = vae.capacity_at(step, c_max, iters)
    assert c == pytest.approx(c_max * step / iters if step <= iters else c_max, rel=1e-12, abs=1e-12)
    assert vae.capacity_at(0, c_max, iters) == 0
    assert vae.capacity_at(step + 1, c_max, iters) >= c  # never decreases

# ----------------------------------------------------------------------------- 8. active units


@given(st.lists(st.sampled_from([0.0, 0.01, 0.05, 0.09, 0.11, 0.2, 1.0, 3.0]), min_size=1, max_size=16))
def test_active_units_counts_dimensions_whose_mean_varies(stds):
    """Posterior means built with a known spread: column j is stds[j] * (+1, -1, +1, ...) + j, whose
    variance over the data is stds[j]^2 * n / (n - 1); active when above 0.01 (std 0.1)."""
    n = 1000
    signs = t([1.0, -1.0]).repeat(n // 2)
    mu = torch.stack([s * signs + j for j, s in enumerate(stds)], dim=1)
    assert vae.active_units(mu) == sum(s ** 2 * n / (n - 1) > 0.01 for s in stds)

# ----------------------------------------------------------------------------- 9. kl_autoencoder.py: the posterior


def latent_shapes(max_elements):
    return st.sampled_from([(c, h, w) for c in (1, 2, 4) for h in (1, 2) for w in (1, 2) if c * h * w <= max_elements])


def gaussian_params(shape):
    """mean and logvar, each (1, C, H, W), of a DiagonalGaussianDistribution."""
    return st.tuples(st.tuples(*[mus] * math.prod(shape)).map(lambda v: t(v).view(1, *shape)),
                     st.tuples(*[logvars] * math.prod(shape)).map(lambda v: t(v).view(1, *shape)))


def diagonal_gaussians(max_elements=8):
    return latent_shapes(max_elements).flatmap(gaussian_params)


def posterior(mean, logvar, n=1):
    return kl.DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1).expand(n, -1, -1, -1))


def log_density(z, mean, logvar):
    """log N(z; mean, diag exp(logvar)) summed over (C, H, W), written out independently."""
    return (-0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / logvar.exp())).sum(dim=(1, 2, 3))


@given(diagonal_gaussians())
@settings(max_examples=40)
def test_posterior_kl_to_the_prior_equals_monte_carlo(q):
    mean, logvar = q
    torch.manual_seed(7)
    z = posterior(mean, logvar, N).sample()
    mc = log_density(z, mean, logvar) - log_density(z, torch.zeros_like(mean), torch.zeros_like(logvar))
    assert_mc(mc, posterior(mean, logvar).kl().item(), "KL to N(0, I)")


@given(latent_shapes(4).flatmap(lambda s: st.tuples(gaussian_params(s), gaussian_params(s))))
@settings(max_examples=40)
def test_posterior_kl_between_two_gaussians_equals_monte_carlo(qr):
    q, r = qr
    torch.manual_seed(8)
    z = posterior(*q, N).sample()
    mc = log_density(z, *q) - log_density(z, *r)
    assert_mc(mc, posterior(*q).kl(posterior(*r)).item(), "KL(q || r)")
    assert posterior(*q).kl(posterior(*q)).abs().item() < 1e-12


@given(diagonal_gaussians(), st.integers(0, 2 ** 32 - 1))
def test_posterior_nll_is_the_gaussian_negative_log_density(q, seed):
    mean, logvar = q
    x = t(np.random.default_rng(seed).normal(0, 3, mean.shape))
    expected = -torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(x).sum()
    assert torch.allclose(posterior(mean, logvar).nll(x), expected, rtol=1e-10, atol=1e-10)


@given(mus, logvars)
@settings(max_examples=30)
def test_posterior_samples_have_the_right_mean_and_variance(mu, logvar):
    p = posterior(t([[[[mu]]]]), t([[[[logvar]]]]), N)
    z = p.sample(generator=torch.Generator().manual_seed(9)).flatten()
    assert_mc(z, mu, "mean")
    assert abs(z.var().item() - math.exp(logvar)) <= SE * math.exp(logvar) * math.sqrt(2 / (N - 1))
    assert torch.equal(p.mode(), p.mean) and torch.allclose(p.std ** 2, p.var)


@given(st.lists(st.floats(-1e-3, 1e-3), min_size=1, max_size=8))
def test_posterior_kl_is_never_negative_in_float32(logvars_near_zero):
    """exp(v) - 1 - v >= 0 but cancels in float32 near v = 0; expm1 keeps each term >= 0 (as vae.gaussian_kl)."""
    logvar = torch.tensor(logvars_near_zero, dtype=torch.float32).view(1, -1, 1, 1)
    assert kl.DiagonalGaussianDistribution(torch.cat([torch.zeros_like(logvar), logvar], dim=1)).kl().item() >= 0


def test_posterior_clamps_logvar_like_ldm():
    p = posterior(t([[[[0.0]], [[0.0]]]]).view(1, 2, 1, 1), t([[[[-50.0]], [[50.0]]]]).view(1, 2, 1, 1))
    assert p.logvar.flatten().tolist() == [-30.0, 20.0]

# ----------------------------------------------------------------------------- 10. kl_autoencoder.py: losses and image metrics

logit_lists = st.lists(st.floats(-20, 20), min_size=1, max_size=30)


@given(logit_lists, logit_lists)
def test_hinge_and_generator_losses_are_their_formulas(real, fake):
    r, f = t(real), t(fake)
    expected = 0.5 * (np.mean([max(0.0, 1 - v) for v in real]) + np.mean([max(0.0, 1 + v) for v in fake]))
    assert kl.hinge_d_loss(r, f).item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert kl.generator_loss(f).item() == pytest.approx(-np.mean(fake), rel=1e-12, abs=1e-12)


@given(seeds, st.floats(1e-3, 1e3))
@settings(max_examples=50)
def test_adaptive_weight_against_a_hand_computation(seed, scale):
    """nll = sum (w x)^2 and g = -scale sum(w * c) for a last layer w: grad nll = 2 w x^2, grad g = -scale c."""
    rng = np.random.default_rng(seed)
    w = t(rng.normal(size=(4, 3))).requires_grad_()
    x, c = t(rng.normal(size=(4, 3))), t(rng.normal(size=(4, 3)))
    nll, g = ((w * x) ** 2).sum(), -scale * (w * c).sum()
    expected = np.linalg.norm(2 * w.detach().numpy() * x.numpy() ** 2) / (np.linalg.norm(scale * c.numpy()) + 1e-4)
    assert kl.adaptive_weight(nll, g, w).item() == pytest.approx(min(expected, 1e4), rel=1e-10)


def test_adaptive_weight_is_clamped():
    w = torch.ones(2, 2, requires_grad=True)
    nll = (w ** 2).sum()  # gradient 2 w: norm 4
    assert kl.adaptive_weight(nll, -(w * 2).sum(), w).item() == pytest.approx(4 / (4 + 1e-4))
    assert kl.adaptive_weight(nll, 0 * w.sum(), w).item() == 1e4  # 4 / 1e-4 = 4e4, clamped


def test_psnr_of_known_cases():
    x = torch.rand(3, 3, 8, 8)
    assert torch.isinf(kl.psnr(x, x)).all()
    offset = (x * 0.8 + 0.1, x * 0.8 + 0.1 + 0.1)  # a constant offset of 0.1: MSE 0.01, 20 dB
    assert torch.allclose(kl.psnr(*offset).double(), torch.full((3,), 20.0), atol=1e-4)
    assert kl.psnr(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)).item() == 0.0  # MSE 1: 0 dB


@given(seeds)
@settings(max_examples=30)
def test_ssim_is_one_for_identical_images_and_less_otherwise(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, 24, 24, generator=g, dtype=torch.float32)
    y = (x + 0.1 * torch.randn(2, 3, 24, 24, generator=g, dtype=torch.float32)).clamp(0, 1)
    assert torch.allclose(kl.ssim(x, x), torch.ones(2, dtype=torch.float32), atol=1e-5)
    s = kl.ssim(x, y)
    assert (s < 1 - 1e-3).all() and (s > -1).all()
    assert torch.allclose(s, kl.ssim(y, x), atol=1e-6)  # symmetric


def test_ssim_of_a_constant_shift_is_the_luminance_term():
    """For y = x + d with x constant, variances and covariance are 0: SSIM = (2 m (m + d) + C1) / (m^2 + (m + d)^2 + C1)."""
    m, d, c1 = 0.4, 0.2, 0.01 ** 2
    expected = (2 * m * (m + d) + c1) / (m ** 2 + (m + d) ** 2 + c1)
    got = kl.ssim(torch.full((1, 1, 16, 16), m), torch.full((1, 1, 16, 16), m + d))
    assert got.item() == pytest.approx(expected, rel=1e-4)


@pytest.fixture(scope="module")
def perceptual():
    torch.manual_seed(0)
    import torchvision
    return kl.Perceptual(torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])).float()  # vgg16().features


@given(seeds)
@settings(max_examples=10)
def test_perceptual_distance_is_zero_for_identical_images_and_symmetric(perceptual, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float32) * 2 - 1 for _ in range(2))
    assert torch.equal(perceptual(x, x), torch.zeros(2))
    d_xy, d_yx = perceptual(x, y), perceptual(y, x)
    assert (d_xy > 0).all() and torch.allclose(d_xy, d_yx, rtol=1e-5)


def ssim_reference(x, y, window=11, sigma=1.5):
    """SSIM written out position by position in float64 (numpy), for one single-channel image."""
    g = np.exp(-(np.arange(window) - (window - 1) / 2) ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for i in range(x.shape[0] - window + 1):
        for j in range(x.shape[1] - window + 1):
            a, b = x[i:i + window, j:j + window], y[i:i + window, j:j + window]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cov = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + 1e-4) * (2 * cov + 9e-4) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
    return float(np.mean(values))


@given(seeds, st.floats(0.01, 0.5))
@settings(max_examples=15)
def test_ssim_matches_a_position_by_position_reference(seed, noise):
    rng = np.random.default_rng(seed)
    x = rng.random((14, 15))
    y = np.clip(x + noise * rng.standard_normal(x.shape), 0, 1)
    got = kl.ssim(torch.tensor(x, dtype=torch.float32)[None, None], torch.tensor(y, dtype=torch.float32)[None, None]).item()
    assert got == pytest.approx(ssim_reference(x, y), abs=1e-5)  # float32 against float64


def linear_features(scale=1.0, seed=0, activation=torch.nn.ReLU):
    """A stand-in for VGG16's .features with the same slice points and channel counts: 1x1
    convolutions without bias (scaled by `scale`) where each slice starts, `activation` elsewhere,
    so the features of c * W are c times those of W."""
    g = torch.Generator().manual_seed(seed)
    layers, channels = [], dict(zip((0, 4, 9, 16, 23), zip((3, *kl.VGG_CHANNELS[:-1]), kl.VGG_CHANNELS)))
    for i in range(30):
        if i in channels:
            conv = torch.nn.Conv2d(*channels[i], 1, bias=False)
            conv.weight.data = scale * torch.randn(conv.weight.shape, generator=g, dtype=torch.float32)
            layers.append(conv)
        else:
            layers.append(activation())
    return torch.nn.Sequential(*layers)


def perceptual_reference(features, x, y):
    """The LPIPS-style distance written out in float64, slice by slice."""
    bounds, total = (0, *kl.VGG_SLICES), 0.0
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    hx, hy = ((v.double() - shift) / scale for v in (x, y))
    for a, b in zip(bounds, bounds[1:]):
        block = features[a:b].double()
        hx, hy = block(hx), block(hy)
        nx, ny = hx / (hx.pow(2).sum(1, keepdim=True) + 1e-10).sqrt(), hy / (hy.pow(2).sum(1, keepdim=True) + 1e-10).sqrt()
        total = total + (nx - ny).pow(2).sum(1).mean(dim=(1, 2))
    return total


@given(seeds, st.floats(0.1, 10))
@settings(max_examples=10)
def test_perceptual_distance_normalises_each_feature_vector(seed, c):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float32) * 2 - 1 for _ in range(2))
    features = linear_features(seed=seed)
    d = kl.Perceptual(features).float()(x, y)
    assert torch.allclose(d.double(), perceptual_reference(features, x, y), rtol=1e-4)
    # features scaled by c > 0 are the same unit vectors: the distance does not change
    assert torch.allclose(kl.Perceptual(linear_features(c, seed)).float()(x, y), d, rtol=1e-4)


def test_perceptual_gradient_is_finite_for_all_zero_features():
    """All-zero feature vectors (a network of zero weights): eps inside the square root keeps the
    gradient finite; outside it, d sqrt(sum f^2) / df = f / sqrt(sum f^2) is 0 / 0. (No ReLU here:
    VGG's ReLUs happen to mask that NaN, a network whose features end in a linear layer does not.)"""
    perceptual = kl.Perceptual(linear_features(0.0, activation=torch.nn.Identity)).float()
    x = (torch.rand(1, 3, 8, 8, dtype=torch.float32) * 2 - 1).requires_grad_()
    perceptual(x, torch.zeros(1, 3, 8, 8, dtype=torch.float32)).sum().backward()
    assert torch.isfinite(x.grad).all()


@given(seeds, st.floats(-3, 3))
@settings(max_examples=30)
def test_nll_with_learned_logvar_is_its_formula_and_minimal_at_the_mean_error(seed, s):
    """sum(rec / e^s + s) / B; over s it is smallest at s* = log(mean rec), where its derivative
    sum(1 - rec e^-s) / B vanishes: the learned scale settles at the mean reconstruction error."""
    rec = t(np.random.default_rng(seed).random((2, 3, 4, 4)) + 0.01)
    assert kl.nll_loss(rec, t(s)).item() == pytest.approx(((rec / math.exp(s) + s).sum() / 2).item(), rel=1e-12)
    s_star = t(math.log(rec.mean().item())).requires_grad_()
    kl.nll_loss(rec, s_star).backward()
    assert abs(s_star.grad.item()) < 1e-9
    assert kl.nll_loss(rec, s_star.detach()) <= kl.nll_loss(rec, t(s))

# ----------------------------------------------------------------------------- 11. agreement with published implementations
# lpips, scikit-image and pytorch-fid are test-time references only (.ci/run installs them); the scripts never import them.


def test_perceptual_distance_agrees_with_the_lpips_package():
    """Our Perceptual with the LPIPS v0.1 linear weights shipped in the lpips wheel, and the same (random) VGG16 trunk
    copied into both: the same distance to 1e-6 relative in float32 (measured: 7e-8 at most; LPIPS adds its eps
    outside the square root, ours inside, which moves the result by far less)."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # vgg16().features, built alone
    features.load_state_dict({k.split(".", 1)[1]: v for k, v in ref.net.state_dict().items()})  # slice1.0.w -> 0.w
    ours = kl.Perceptual(features)
    kl.load_lpips_weights(ours, os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth"))
    assert not torch.equal(ours.weights[0], torch.ones_like(ours.weights[0]))  # the calibrated weights are in use
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 64, 64, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        expected, got = ref(x, y).flatten(), ours(x, y)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0), (got, expected)


@given(seeds, st.floats(0.01, 0.5))
@settings(max_examples=20)
def test_ssim_agrees_with_scikit_image(seed, noise):
    """skimage's structural_similarity with the Gaussian window of Wang et al. (sigma 1.5, population covariances)
    averages the SSIM map over the positions where the window fits, as ours does: equal to 1e-5 in float32
    (measured: 2.4e-7 at most over 50 seeds; float32 window sums)."""
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(seed)
    x = rng.random((3, 32, 40)).astype(np.float32)
    y = np.clip(x + noise * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    expected = metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                             data_range=1.0, channel_axis=0)
    assert kl.ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None]).item() == pytest.approx(expected, abs=1e-5)


@given(seeds, st.integers(2, 32))
@settings(max_examples=25)
def test_frechet_distance_agrees_with_pytorch_fid(seed, d):
    """pytorch-fid's calculate_frechet_distance (scipy's sqrtm) on well-conditioned covariances: 1e-8 relative
    (measured: 9e-15 at most over 50 seeds in 16 dimensions)."""
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(seed)
    f1, f2 = rng.standard_normal((4 * d + 8, d)), 1.5 * rng.standard_normal((4 * d + 8, d)) + 0.2
    stats = [f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)]
    expected = fid_score.calculate_frechet_distance(*stats)
    assert vae.frechet_distance(*stats) == pytest.approx(expected, rel=1e-8)
    assert kl.frechet_distance(*stats) == pytest.approx(expected, rel=1e-8)
