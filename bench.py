"""
Time one training epoch of vae.py's loop against the classic DataLoader loop, side by side.

    python bench.py --device cpu
    python bench.py --device cuda [--compile] [--amp]

Both train the same model, pytorch/examples' 784-400-20 ReLU VAE, with batch 128 and Adam 1e-3 on
the real MNIST training set (60,000 images in --data-dir, as for vae.py). The classic loop is
written the way pytorch/examples `vae/main.py` feeds it: a DataLoader over torchvision's MNIST with
a per-image ToTensor() transform (num_workers 1 and pinned memory on CUDA), a copy to the device
per batch, BCE on grey levels, and `loss.item()` after every step. vae.py's loop is
`vae.train_epoch`: the data on the device once, one permutation per epoch, batches by slicing,
dynamic binarization on the device, one host sync per epoch. Each loop runs --warmup epochs first,
then --repeats timed epochs; the median is reported.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import vae


def classic_epoch(model, opt, loader, device):
    """pytorch/examples' training loop (its model has sigmoid outputs and BCE on grey levels)."""
    model.train()
    train_loss = 0.0
    for x, _ in loader:
        x = x.to(device).view(-1, 784)
        mu, logvar = model.encode(x)
        recon = torch.sigmoid(model.decode(vae.reparameterize(mu, logvar)))
        loss = F.binary_cross_entropy(recon, x, reduction="sum") + vae.gaussian_kl(mu, logvar).sum()
        opt.zero_grad()
        loss.backward()
        train_loss += loss.item()
        opt.step()
    return train_loss / len(loader.dataset)


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="for vae.py's loop")
    p.add_argument("--amp", action="store_true", help="for vae.py's loop")
    args = p.parse_args()
    try:
        device = vae.get_device(args.device)
        cfg = vae.parse_args(["--hidden", "400", "--latent-dim", "20", "--batch-size", "128", "--lr", "1e-3"]
                             + ["--compile"] * args.compile + ["--amp"] * args.amp)
        x_train, _ = vae.load_mnist(args.data_dir, device)
    except vae.UserError as e:
        raise SystemExit(f"bench.py: error: {e}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def fresh():
        torch.manual_seed(0)
        model = vae.VAE(hidden=[400], latent_dim=20, activation="relu").to(device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")

    dataset = torchvision.datasets.MNIST(args.data_dir, train=True, transform=torchvision.transforms.ToTensor())
    loader_kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True, **loader_kwargs)
    model, opt = fresh()
    classic = timed(lambda: classic_epoch(model, opt, loader, device), device, args.warmup, args.repeats)

    model, opt = fresh()
    terms_fn = torch.compile(vae.train_terms) if args.compile else vae.train_terms
    ours = timed(lambda: vae.train_epoch(model, opt, x_train, cfg, 0, terms_fn), device, args.warmup, args.repeats)

    n = len(dataset)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; median of {args.repeats} epochs after {args.warmup} warm-up")
    suffix = " (compiled)" * args.compile + " (bf16)" * args.amp
    for label, seconds, images in [("DataLoader + ToTensor loop (pytorch/examples)", classic, n),
                                   ("vae.py loop" + suffix, ours, len(x_train) // 128 * 128)]:
        print(f"{label:<48} {seconds:7.3f} s/epoch {images / seconds:10,.0f} img/s")
    print(f"speed-up: {classic / ours:.1f}x")


if __name__ == "__main__":
    main()
