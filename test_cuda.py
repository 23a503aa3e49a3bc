"""The CUDA paths of both programs: `pytest -m cuda` on a machine with a GPU. Every test here skips
without CUDA (CI has none), so `pytest` on a CPU machine reports them as skipped."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import kl_autoencoder as kl
import sd_vae as sd
import vae
from test_vae import HERE, KL_CONFIGS, data_dir, diffusers_autoencoder, kl_data, relative_error, tiny_model  # noqa: F401

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VAE_TINY = ["--hidden", "64", "--latent-dim", "4", "--batch-size", "32", "--lr", "3e-3", "--eval-samples", "1000"]


def records(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.parametrize("flags", [[], ["--amp"], ["--compile"]], ids=["eager", "amp", "compile"])
def test_vae_trains_on_cuda(data_dir, tmp_path, flags):
    record = vae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "3", "--device", "cuda", *VAE_TINY,
                       *flags])
    epochs = records(str(tmp_path), "epoch")
    assert len(epochs) == 3 and all(math.isfinite(r["train_loss"]) for r in epochs)
    assert epochs[-1]["train_bound"] < epochs[0]["train_bound"]  # it learns
    assert math.isfinite(record["test_nll"]) and record["test_nll"] < record["test_nelbo"]


def test_vae_checkpoint_gives_the_same_numbers_on_cpu_and_cuda(data_dir, tmp_path):
    """Different devices draw different samples, so the two evaluations agree to Monte Carlo error: on this model
    (64 test images) the spread over seeds, measured on the CPU, is 0.39 nats for the one-sample -ELBO and 0.014
    nats for the K = 1000 NLL; the difference of two independent estimates is allowed 6 times sqrt(2) of that."""
    vae.main(["--data-dir", data_dir, "--out", str(tmp_path), "--epochs", "2", "--device", "cpu", *VAE_TINY])
    ckpt = str(tmp_path / "ckpt.pt")
    cpu, cuda = (vae.main(["--eval-only", "--ckpt", ckpt, "--data-dir", data_dir, "--device", device, "--out",
                           str(tmp_path / device), "--eval-samples", "1000"]) for device in ("cpu", "cuda"))
    assert abs(cpu["test_nelbo"] - cuda["test_nelbo"]) <= 6 * math.sqrt(2) * 0.39
    assert abs(cpu["test_nll"] - cuda["test_nll"]) <= 6 * math.sqrt(2) * 0.014
    assert cpu["active_units"] == cuda["active_units"]


KL_CUDA = ["--preset", "tiny", "--resolution", "32", "--batch-size", "8", "--val-size", "16", "--device", "cuda",
           "--perceptual-weight", "0", "--lr", "1e-3", "--log-every", "4", "--eval-every", "0"]


@pytest.mark.parametrize("flags", [[], ["--compile"]], ids=["eager", "compile"])
def test_kl_trains_on_cuda_in_bf16_with_ema_and_discriminator(kl_data, tmp_path, flags):
    """bf16 autocast (the CUDA default), channels_last, TF32, EMA, the discriminator from step 4."""
    out = str(tmp_path / "run")
    final = kl.main(["train", "--data", kl_data, *KL_CUDA, "--steps", "12", "--disc-start", "4", "--ema", "0.9",
                     "--out", out, *flags])
    logs = records(out, "train")
    assert all(math.isfinite(r[k]) for r in logs for k in kl.LOG_COLUMNS) and logs[-1]["g"] != 0
    assert logs[-1]["peak_gib"] > 0 and math.isfinite(final["psnr"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["precision"] == "bf16" and ckpt["ema"] is not None


def test_torchrun_one_process_with_nccl(kl_data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                             "kl_autoencoder.py", "train", "--data", kl_data, *KL_CUDA, "--steps", "4",
                             "--disc-start", "2", "--out", str(tmp_path / "ddp")],
                            cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 process(es) on cuda nccl" in result.stdout


def test_reconstruct_in_bf16_on_cuda_matches_fp32_on_cpu(tmp_path):
    torch.manual_seed(0)
    weights = str(tmp_path / "tiny.safetensors")
    kl.save_safetensors(tiny_model().state_dict(), weights)
    torchvision.io.write_png(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), str(tmp_path / "in.png"))
    psnr = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "bf16")):
        psnr[device] = sd.main(["reconstruct", "--weights", weights, "--preset", "tiny", "--image",
                                str(tmp_path / "in.png"), "--out", str(tmp_path / f"{device}.png"), "--device", device,
                                "--dtype", dtype])
    assert abs(psnr["cpu"] - psnr["cuda"]) < 0.5  # bf16 keeps 8 bits of mantissa: far below 8-bit image steps


def test_parity_with_diffusers_on_cuda():
    ref = diffusers_autoencoder(KL_CONFIGS["sd"]).cuda()
    ours = kl.AutoencoderKL(latent_channels=4, **KL_CONFIGS["sd"]).eval().cuda()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64, device="cuda") * 2 - 1
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full float32 on both sides
    try:
        with torch.no_grad():
            assert relative_error(ours(x), ref(x).sample) <= 1e-5
            ref, ours, x = ref.double(), ours.double(), x.double()
            assert relative_error(ours(x), ref(x).sample) <= 1e-12
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_encode_and_tiled_decode_on_cuda_in_bf16_match_the_cpu(tmp_path):
    """sd_vae.py encode --dtype bf16 on the GPU against fp32 on the CPU (bf16 rounds to about 3 significant digits, so latents
    agree to a few percent), and a tiled decode on the GPU against the same tiled decode on the CPU."""
    torch.manual_seed(0)
    weights = str(tmp_path / "tiny.safetensors")
    kl.save_safetensors(tiny_model().state_dict(), weights)
    (tmp_path / "images").mkdir()
    for i in range(4):
        torchvision.io.write_png(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), str(tmp_path / "images" / f"{i}.png"))
    latents = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "bf16")):
        sd.main(["encode", "--weights", weights, "--preset", "tiny", "--data", str(tmp_path / "images"), "--resolution", "64",
                 "--device", device, "--dtype", dtype, "--out", str(tmp_path / f"{device}.safetensors")])
        latents[device] = kl.load_safetensors(str(tmp_path / f"{device}.safetensors"))["latents"]
    assert relative_error(latents["cuda"], latents["cpu"]) <= 0.05
    model = tiny_model(sample_size=32)
    model.load_state_dict(kl.load_safetensors(weights))
    z = torch.randn(2, 4, 48, 40)
    with torch.no_grad():
        cpu = sd.tiled_decode(model.eval(), z)
        cuda = sd.tiled_decode(model.cuda(), z.cuda()).cpu()
    assert relative_error(cuda, cpu) <= 1e-3  # TF32 may be on: 10-bit mantissa
