"""Tests of the programs: data loading, training, checkpoints, resume, evaluation, the CLI, bad input.

Nothing here touches the network: the tests write their own small MNIST-format files.
The property tests of the formulas are in test_math.py.
"""

import gzip
import json
import math
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import vae

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--device", "cpu", "--hidden", "64", "--latent-dim", "4", "--batch-size", "32", "--lr", "3e-3", "--eval-samples", "16"]


# ----------------------------------------------------------------------------- helpers

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


def run_main(args, capsys=None):
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


# ----------------------------------------------------------------------------- data

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


def test_missing_mnist_without_network_is_one_line_error(tmp_path, monkeypatch, capsys):
    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\n<urlopen error>")
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    code = run_main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), *TINY])
    assert code == 2
    one_line_error(capsys, os.path.join(str(tmp_path), "MNIST", "raw"), "train-images-idx3-ubyte")


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


# ----------------------------------------------------------------------------- training and outputs

def test_training_lowers_the_loss(trained):
    out, _ = trained
    epochs = [r for r in read_metrics(out) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5, 6]
    # On 64 test images the one-sample -ELBO has a standard error of about 1 nat at this scale;
    # six epochs on these strokes take tens of nats off it.
    assert epochs[-1]["test_nelbo"] < epochs[0]["test_nelbo"] - 10
    assert epochs[-1]["train_bound"] < epochs[0]["train_bound"] - 10


def test_every_output_is_written(trained):
    out, record = trained
    for name in ["ckpt.pt", "metrics.jsonl", "samples.png", "reconstructions.png", "interpolations.png"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not os.path.exists(os.path.join(out, "manifold.png"))  # only for 2 latents
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    samples = torchvision.io.read_image(os.path.join(out, "samples.png"))
    assert samples.shape == (1, 8 * 30 + 2, 8 * 30 + 2)  # 8 x 8 digits of 28 pixels, 2-pixel borders
    final = read_metrics(out)[-1]
    assert final["kind"] == "eval" and final == record
    for key in ["test_nelbo", "test_nll", "eval_samples", "active_units", "posterior_mean", "posterior_std"]:
        assert key in final
    assert final["eval_samples"] == 16 and 0 <= final["active_units"] <= 4
    assert len(final["posterior_mean"]) == len(final["posterior_std"]) == 4
    # the importance-sampled NLL is a tighter bound than the ELBO (K = 16 vs 1, 64 images)
    assert final["test_nll"] < final["test_nelbo"]


def test_manifold_for_two_latents(data_dir, tmp_path):
    vae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "1", *TINY, "--latent-dim", "2"])
    manifold = torchvision.io.read_image(str(tmp_path / "manifold.png"))
    assert manifold.shape == (1, 20 * 30 + 2, 20 * 30 + 2)


@pytest.mark.parametrize("flags", [
    ["--arch", "conv"],
    ["--likelihood", "gaussian"],
    ["--train-samples", "5"],
    ["--beta", "4"],
    ["--capacity", "5", "--capacity-iters", "10", "--gamma", "10"],
    ["--activation", "tanh", "--lr-schedule", "iwae"],
])
def test_every_variant_trains(data_dir, tmp_path, flags):
    record = vae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "2", *TINY, *flags])
    epochs = [r for r in read_metrics(str(tmp_path)) if r["kind"] == "epoch"]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_nelbo"]) for r in epochs)
    assert math.isfinite(record["test_nll"]) and record["test_nll"] <= record["test_nelbo"] + 1


def test_output_bias_starts_at_the_mean_image():
    x = torch.rand(100, 784) * 0.5
    model = vae.VAE(hidden=[8], latent_dim=2)
    vae.init_output_bias(model, x)
    assert torch.allclose(torch.sigmoid(model.out_bias), x.mean(0).clamp(1e-3, 1 - 1e-3), atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints and resume

def test_checkpoint_round_trip(tmp_path):
    cfg = vae.parse_args(["--hidden", "16", "--latent-dim", "3", "--out", str(tmp_path)])
    model = vae.VAE(cfg.arch, cfg.hidden, cfg.latent_dim, cfg.activation, cfg.likelihood)
    opt = torch.optim.Adam(model.parameters())
    vae.save_checkpoint(cfg.ckpt, model, opt, cfg, 7)
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file is gone
    ckpt = torch.load(cfg.ckpt, weights_only=True)
    assert ckpt["epoch"] == 7 and ckpt["config"]["hidden"] == [16]
    loaded = vae.model_from_checkpoint(vae.load_checkpoint(cfg.ckpt), cfg.ckpt)
    z = torch.randn(5, 3)
    assert torch.equal(loaded.decode(z), model.decode(z))
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_equals_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    args = ["--data-dir", data_dir, "--epochs", "4", *TINY]
    vae.main([*args, "--out", str(tmp_path / "straight")])

    real_save = vae.save_checkpoint

    def interrupted_save(path, model, opt, cfg, epoch):
        if epoch == 3:  # Ctrl-C after epoch 3 was logged, before its checkpoint: ckpt.pt holds epoch 2
            raise KeyboardInterrupt
        real_save(path, model, opt, cfg, epoch)
    monkeypatch.setattr(vae, "save_checkpoint", interrupted_save)
    assert run_main([*args, "--out", str(tmp_path / "resumed")]) == 130
    monkeypatch.setattr(vae, "save_checkpoint", real_save)
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


def test_chunked_nll_combines_chunks_exactly():
    """K = 60 in chunks of 25, 25, 10 must estimate L_60, not an average of L_25s."""
    torch.manual_seed(0)
    model = vae.VAE(hidden=[64], latent_dim=4)
    x = vae.prepare_test_set(torch.tensor(fake_digits(400, 3), dtype=torch.float32).view(400, 784) / 255, "bernoulli")
    whole = vae.test_nll(model, x, 60, rows=60 * 400)
    chunked = vae.test_nll(model, x, 60, rows=25)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        l25 = -vae.iwae_bound(x, mu, logvar, model.log_likelihood, 25).mean().item()
    assert abs(chunked - whole) < 0.3 * abs(l25 - whole)  # same estimand; L_25 is measurably worse
    assert l25 > whole


def test_active_units_and_aggregate_posterior():
    mu = torch.zeros(1000, 3)
    mu[:, 0] = torch.randn(1000)  # varies with x: active
    mu[:, 1] = 0.05 * torch.randn(1000)  # variance 0.0025 < 0.01: inactive
    assert vae.active_units(mu) == 1
    mean, std = vae.aggregate_posterior(mu, torch.zeros(1000, 3))
    assert torch.allclose(std, (1 + mu.var(0, correction=0)).sqrt())
    assert torch.allclose(mean, mu.mean(0))


def test_fid_with_a_stand_in_network(data_dir, tmp_path, monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 16))
    monkeypatch.setattr(vae, "load_inception", lambda device: net)
    record = vae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "1", *TINY, "--fid", "--fid-samples", "32"])
    assert record["fid_samples"] == 32 and math.isfinite(record["fid"]) and record["fid"] > 0


def test_fid_without_inception_weights_is_one_line_error(data_dir, tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert run_main(["--data-dir", data_dir, "--out", str(tmp_path), *TINY, "--fid"]) == 2
    one_line_error(capsys, "inception_v3_google", "checkpoints")
    assert not os.path.exists(tmp_path / "ckpt.pt")  # it failed before training


# ----------------------------------------------------------------------------- the command line

def test_help_works():
    result = subprocess.run([sys.executable, "vae.py", "--help"], cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 0
    assert "--eval-samples" in result.stdout and "--preset" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_fails_cleanly(data_dir, tmp_path):
    result = subprocess.run([sys.executable, "vae.py", "--device", "cuda", "--data-dir", data_dir, "--out", str(tmp_path)],
                            cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("vae.py: error: --device cuda") and len(result.stderr.strip().splitlines()) == 1


def test_preset_iwae_and_its_schedule():
    cfg = vae.parse_args(["--preset", "iwae"])
    assert (cfg.hidden, cfg.latent_dim, cfg.activation, cfg.batch_size, cfg.epochs, cfg.adam_eps) == ([200, 200], 50, "tanh", 20, 3280, 1e-4)
    assert vae.parse_args(["--preset", "iwae", "--epochs", "3"]).epochs == 3  # explicit flags win
    lrs = [vae.lr_at(e, cfg) for e in range(cfg.epochs)]
    stages = [lrs.count(lr) for lr in sorted(set(lrs), reverse=True)]
    assert stages == [3 ** i for i in range(8)]  # 1 + 3 + ... + 2187 = 3280 epochs
    assert [round(lr / 1e-3, 12) for lr in sorted(set(lrs), reverse=True)] == [round(10 ** (-i / 7), 12) for i in range(8)]


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], ["--epochs", "must be > 0"]),
    (["--lr", "-1"], ["--lr"]),
    (["--hidden", "wide"], ["--hidden", "'wide'"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--beta", "2", "--capacity", "5"], ["--capacity", "--beta"]),
    (["--train-samples", "5", "--beta", "4"], ["--train-samples"]),
    (["--batch-size", "100000"], ["--batch-size"]),
    (["--eval-only", "--ckpt", "nowhere/ckpt.pt"], ["nowhere/ckpt.pt"]),
    (["--resume"], ["no checkpoint"]),
])
def test_bad_input_is_one_line_error(data_dir, tmp_path, capsys, args, words):
    assert run_main(["--data-dir", data_dir, "--out", str(tmp_path), "--device", "cpu", *args]) == 2
    one_line_error(capsys, *words)


def test_a_run_never_overwrites_a_checkpoint(trained, data_dir, capsys):
    out, _ = trained
    before = os.path.getmtime(os.path.join(out, "ckpt.pt"))
    assert run_main(["--data-dir", data_dir, "--out", out, *TINY, "--epochs", "1"]) == 2
    one_line_error(capsys, "exists", "--resume")
    assert os.path.getmtime(os.path.join(out, "ckpt.pt")) == before


def test_resume_with_another_model_is_one_line_error(trained, data_dir, capsys):
    out, _ = trained
    assert run_main(["--data-dir", data_dir, "--out", out, *TINY, "--hidden", "32", "--resume", "--epochs", "7"]) == 2
    one_line_error(capsys, "--hidden [64]")


def test_corrupt_checkpoint_is_one_line_error(data_dir, tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    assert run_main(["--eval-only", "--ckpt", str(tmp_path / "ckpt.pt"), "--data-dir", data_dir, "--device", "cpu"]) == 2
    one_line_error(capsys, "ckpt.pt")
