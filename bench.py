"""
Side-by-side timings of our two programs against the code they replace, in one run each.

    python bench.py --device cpu                      # vae.py's epoch against the classic DataLoader loop
    python bench.py eval --device cpu                 # vae.py's evaluation: its diagnostics against an epoch
    python bench.py whole --device cpu --examples-vae PATH/vae/main.py    # two whole 2-epoch processes
    python bench.py --device cuda [--compile [--compile-mode reduce-overhead]] [--amp] [--graph]
    python bench.py kl --device cpu --preset tiny --batch-size 8 --resolution 64
    python bench.py kl --device cuda --preset sd --batch-size 8 --resolution 256 --amp [--channels-last] [--compile]
    python bench.py tiles --device cpu --preset sd --resolution 1024           # sd_vae.py's tiles
    python bench.py campaign --device cuda --data-dir data --out runs/campaign   # all of it, on a GPU (issue 17)
    python bench.py campaign --device cpu --data-dir data --out runs/dry --dry-run   # every step tiny, on a CPU

vae: both train the same model, pytorch/examples' 784-400-20 ReLU VAE, with batch 128 and Adam 1e-3 on
the real MNIST training set (60,000 images in --data-dir, as for vae.py). The classic loop is
written the way pytorch/examples `vae/main.py` feeds it: a DataLoader over torchvision's MNIST with
a per-image ToTensor() transform (num_workers 1 and pinned memory on CUDA), a copy to the device
per batch, BCE on grey levels, `loss.item()` after every step, and torch.optim.Adam's default
implementation. vae.py's loop is `vae.train_epoch`: the data on the device once, one permutation per
epoch, batches by slicing, dynamic binarization on the device, one host sync per epoch, and the fused
Adam that `vae.train` builds (one kernel for all parameters, on the CPU too). With --graph a third side replays
vae.py's whole step (forward, backward, a capturable fused Adam) from one CUDA graph, to be measured before vae.py
takes it on; --compile-mode reduce-overhead is torch.compile's own way to CUDA graphs.

eval: one training epoch of vae.py's default model (784-512-512-32) on MNIST, then the evaluation's diagnostics on the
10,000 test images, timed: everything evaluate() computes but the K-sample NLL (the test -ELBO, the posterior means,
active units, aggregate posterior, KL per dimension, mutual information), and the mutual information alone, as
vae.py computes it (one matrix product, float64) and element-wise as it did before (float32), with both values.

whole: wall time of two whole processes of 2 epochs each, started alternately --repeats times: vae.py (the DataLoader
example's 784-400-20 ReLU model, test NLL with K = --eval-samples, its pictures) and pytorch/examples' vae/main.py itself (each
epoch's test loss and pictures), both on the MNIST of --data-dir (main.py reads ../data: a link there is made).

kl: one training step (forward, backward, Adam) of kl_autoencoder.py's AutoencoderKL against
diffusers' AutoencoderKL (which must be installed) at the same config, batch and resolution, with
the same loss: L1 reconstruction of a posterior sample + 1e-6 * KL. diffusers runs in its default
float32; ours optionally with bf16 autocast (--amp), channels_last memory (--channels-last) and its encoder and
decoder compiled (--compile).
On CUDA it also reports peak memory, and the inference time of encode + decode of one image.

tiles: the peak memory and time of decoding one --resolution image (from a random latent, with the preset's
random weights: memory and time do not depend on the values) by sd_vae.py, whole and in tiles
(--tile on: diffusers' enable_tiling scheme), each in a fresh process. On the CPU the peak is the process's
peak resident set (ru_maxrss), shown with what it was before decoding (Python, torch, the weights); on CUDA
it is torch.cuda.max_memory_allocated.

campaign: the measurements a GPU is wanted for, in order of value, each a command of its own run with a time limit,
its output, time, exit code, the GPU's name and torch's version appended to OUT/report.json and OUT/report.md as it
ends. A step that succeeded is not run again, so the campaign continues where the last call stopped (calls to a
lent GPU are limited to 10 minutes: pass --minutes, and call it again). --dry-run runs every step at tiny sizes.

Each side runs --warmup epochs (or steps) first, then --repeats timed ones; the median is reported.
The timed epochs and steps are interleaved (one side, then the other, alternating which goes first), so
that the drifts in speed of a shared machine affect both sides alike.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import torchvision

import kl_autoencoder as kl
import sd_vae as sd
import vae


def autoencoder(preset):
    """The model of one of sd_vae.py's presets (every family's), with its random initial weights."""
    config = sd.PRESETS[preset]
    return kl.build(config, preset, sd.model_class(config))


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


def describe(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {torch.get_num_threads()} threads"
    return f"device: {name}; torch {torch.__version__}"


def bench_vae(args, device):
    try:
        cfg = vae.parse_args(["--hidden", "400", "--latent-dim", "20", "--batch-size", "128", "--lr", "1e-3"]
                             + ["--compile"] * args.compile + ["--amp"] * args.amp)
        x_train, _ = vae.load_mnist(args.data_dir, device)
    except vae.UserError as e:
        raise SystemExit(f"bench.py: error: {e}")

    def fresh(fused):
        torch.manual_seed(0)
        model = vae.VAE(hidden=[400], latent_dim=20, activation="relu").to(device)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)

    dataset = torchvision.datasets.MNIST(args.data_dir, train=True, transform=torchvision.transforms.ToTensor())
    loader_kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, shuffle=True, **loader_kwargs)
    classic_model, classic_opt = fresh(fused=None)  # pytorch/examples: torch.optim.Adam's default implementation
    model, opt = fresh(fused=device.type in ("cuda", "cpu"))  # as vae.train builds it
    terms_fn = torch.compile(vae.train_terms, mode=args.compile_mode) if args.compile else vae.train_terms
    sides = {"classic": lambda: classic_epoch(classic_model, classic_opt, loader, device),
             "ours": lambda: vae.train_epoch(model, opt, x_train, cfg, epoch=0, terms_fn=terms_fn)}
    if args.graph:
        graphed_model, _ = fresh(fused=True)
        sides["graphed"] = graphed_epoch(graphed_model, x_train, cfg)
    seconds = interleaved(sides, device, args.warmup, args.repeats)

    n = len(dataset)
    print(f"{describe(device)}; median of {args.repeats} interleaved epochs after {args.warmup} warm-up each")
    suffix = f" (compiled, {args.compile_mode})" * args.compile + " (bf16)" * args.amp
    for label, name, images in [("DataLoader + ToTensor loop (pytorch/examples)", "classic", n),
                                ("vae.py loop" + suffix, "ours", len(x_train) // 128 * 128),
                                ("vae.py's step in one CUDA graph", "graphed", len(x_train) // 128 * 128)][:2 + args.graph]:
        print(f"{label:<48} {seconds[name]:7.3f} s/epoch {images / seconds[name]:10,.0f} img/s")
    print(f"speed-up: {seconds['classic'] / seconds['ours']:.1f}x"
          + (f"; the CUDA graph: {seconds['classic'] / seconds['graphed']:.1f}x" if args.graph else ""))


def graphed_epoch(model, x_train, cfg):
    """A function that runs one epoch of vae.train_epoch's ELBO steps (the same permutation, binarization and batches)
    with the whole step, forward, backward and a capturable fused Adam, captured once in a CUDA graph (as PyTorch's
    "whole network capture" recipe: warm-up steps on a side stream, gradients None before the capture) and replayed
    for each batch after a copy of the batch into its static input. Returns the epoch's mean loss (one host sync)."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True, capturable=True)
    bs, steps = cfg.batch_size, len(x_train) // cfg.batch_size
    static_x, sums = vae.prepare(x_train[:bs], cfg.likelihood), torch.zeros((), device=x_train.device)

    def step():
        log_px_z, kl = vae.train_terms(model, static_x, 1)
        loss = (kl - log_px_z).mean()
        loss.backward()
        opt.step()
        sums.add_(loss.detach())
    model.train()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()

    def epoch():
        sums.zero_()
        x_epoch = vae.prepare(x_train[torch.randperm(len(x_train), device=x_train.device)], cfg.likelihood)
        for i in range(steps):
            static_x.copy_(x_epoch[i * bs:(i + 1) * bs])
            graph.replay()
        return (sums / steps).item()
    return epoch


def interleaved(sides, device, warmup, repeats):
    """The median time of each side's function, run in turns (one side, then the other, alternating which goes
    first) after `warmup` runs each, so that the drifts in speed of a shared machine affect both sides alike."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in sides}
    for r in range(repeats):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            times[name].append(timed(sides[name], device, 0, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def elementwise_mutual_information(mu, logvar, rows=2 ** 24):
    """vae.mutual_information as it was before it became one matrix product: log q(z_n|x_m) element-wise, float32."""
    z = vae.reparameterize(mu, logvar)
    chunk = max(1, rows // (len(mu) * mu.shape[1]))
    log_q_z = torch.cat([torch.logsumexp(vae.log_normal(part[:, None], mu, logvar), dim=1) for part in z.split(chunk)])
    return (vae.log_normal(z, mu, logvar) - (log_q_z - math.log(len(mu)))).mean().item()


def bench_eval(args, device):
    cfg = vae.parse_args(["--device", str(device)])
    x_train, x_test_grey = vae.load_mnist(args.data_dir, device)
    x_test = vae.prepare_test_set(x_test_grey, cfg.likelihood)
    torch.manual_seed(0)
    model = vae.VAE(cfg.arch, cfg.hidden, cfg.latent_dim, cfg.activation, cfg.likelihood).to(device)
    vae.init_output_bias(model, x_train)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type in ("cuda", "cpu"))
    epoch = timed(lambda: vae.train_epoch(model, opt, x_train, cfg, epoch=0), device, 0, 1)

    def diagnostics():  # evaluate() without the K-sample NLL
        vae.test_elbo(model, x_test)
        mu, logvar = vae.posterior_means(model, x_test)
        vae.active_units(mu), vae.aggregate_posterior(mu, logvar), vae.kl_per_dimension(mu, logvar)
        return vae.mutual_information(mu, logvar)
    mu, logvar = vae.posterior_means(model, x_test)
    values, seconds = {}, {}
    for name, fn in (("diagnostics", diagnostics), ("mutual_information", vae.mutual_information),
                     ("element-wise", elementwise_mutual_information)):
        torch.manual_seed(0)
        values[name] = fn() if name == "diagnostics" else fn(mu, logvar)
        seconds[name] = timed(lambda: fn() if name == "diagnostics" else fn(mu, logvar), device, 0, args.repeats)
    print(f"{describe(device)}; median of {args.repeats}; vae.py's default model after one epoch of "
          f"{epoch:.2f} s, the 10,000 test images")
    print(f"the diagnostics (all of evaluate() but the test NLL): {seconds['diagnostics']:.2f} s, "
          f"{seconds['diagnostics'] / epoch:.2f} epochs")
    print(f"mutual information, one matrix product (float64): {seconds['mutual_information']:.2f} s, "
          f"I = {values['mutual_information']:.9f} nats")
    print(f"mutual information, element-wise (float32, before): {seconds['element-wise']:.2f} s, "
          f"I = {values['element-wise']:.9f} nats ({seconds['element-wise'] / seconds['mutual_information']:.1f}x "
          f"the time; the two differ by {abs(values['element-wise'] - values['mutual_information']):.1e} nats)")


def bench_whole(args, device):
    if not args.examples_vae or not os.path.isfile(args.examples_vae):
        raise SystemExit("bench.py: error: whole needs --examples-vae, the path of pytorch/examples' vae/main.py")
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, "run", "results"))
        os.symlink(os.path.abspath(args.data_dir), os.path.join(work, "data"))  # main.py's ../data
        here = os.path.dirname(os.path.abspath(__file__))
        commands = {"pytorch/examples": [sys.executable, os.path.abspath(args.examples_vae), "--epochs", "2"]
                    + ["--no-accel"] * (device.type == "cpu"),
                    "vae.py": [sys.executable, os.path.join(here, "vae.py"), "--epochs", "2", "--hidden", "400",
                               "--latent-dim", "20", "--activation", "relu", "--eval-samples", str(args.eval_samples),
                               "--device",
                               str(device), "--data-dir", os.path.abspath(args.data_dir), "--overwrite", "--out",
                               os.path.join(work, "vae")]}

        def process(name):
            return lambda: subprocess.run(commands[name], cwd=os.path.join(work, "run"), check=True,
                                          capture_output=True)
        seconds = interleaved({name: process(name) for name in commands}, device, 0, args.repeats)
    print(f"{describe(device)}; two whole processes of 2 epochs each, median of {args.repeats}, alternating")
    for name, command in commands.items():
        print(f"{name:<17} {seconds[name]:7.1f} s: {' '.join(os.path.basename(c) for c in command[1:3])} "
              f"{' '.join(command[3:13])}")
    print(f"vae.py's whole run: {seconds['pytorch/examples'] / seconds['vae.py']:.2f}x as fast")


def kl_step(encode, decode, opt, x):
    """L1 reconstruction of a posterior sample + 1e-6 KL; forward, backward, Adam."""
    posterior = encode(x)
    loss = (decode(posterior.sample()) - x).abs().mean() + 1e-6 * posterior.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_kl(args, device):
    try:
        import diffusers
    except ImportError:
        raise SystemExit("bench.py: error: bench.py kl compares with diffusers: pip install diffusers")
    config = kl.diffusers_config(autoencoder(args.preset))
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1

    def side(name):
        """(model, optimizer, one training step) of one side."""
        torch.manual_seed(0)
        if name == "diffusers":
            model = diffusers.AutoencoderKL.from_config(config).to(device)
            encode, decode, inputs = (lambda x: model.encode(x).latent_dist), (lambda z: model.decode(z).sample), x
            autocast = torch.autocast(device.type, enabled=False)
        else:
            model, inputs = autoencoder(args.preset).to(device), x
            if args.channels_last:
                model, inputs = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            if args.compile:  # the encoder and the decoder themselves, as kl_autoencoder.py's --compile
                model.encoder.compile()
                model.decoder.compile()
            encode, decode = model.encode, model.decode
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=cuda)

        def step():
            with autocast:
                kl_step(encode, decode, opt, inputs)
        return model, opt, step

    sides = {name: side(name) for name in ("diffusers", "ours")}
    peak = {}
    for name, (model, opt, step) in sides.items():
        for _ in range(args.warmup):
            step()
        if cuda:  # this side's resident state (weights, gradients, Adam) plus what one step allocates on top of everything
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize()
            tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
            tensors += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
            peak[name] = (sum(t.numel() * t.element_size() for t in tensors) + torch.cuda.max_memory_allocated(device) - before) / 2 ** 30
    seconds = interleaved({name: step for name, (_, _, step) in sides.items()}, device, 0, args.repeats)
    label = f"{args.preset}, batch {args.batch_size}, {args.resolution}x{args.resolution}"
    print(f"{describe(device)}; {label}; median of {args.repeats} interleaved steps after {args.warmup} warm-up each")
    ours_label = "kl_autoencoder.py" + " bf16" * args.amp + " channels_last" * args.channels_last + " compiled" * args.compile
    for name, shown in [("diffusers", "diffusers AutoencoderKL fp32"), ("ours", ours_label)]:
        mem = f"  peak {peak[name]:6.2f} GiB" if cuda else ""
        print(f"{shown:<48} {seconds[name]:7.3f} s/step {args.batch_size / seconds[name]:9.1f} img/s{mem}")
    print(f"speed-up: {seconds['diffusers'] / seconds['ours']:.2f}x")
    if cuda:
        del sides
        model = autoencoder(args.preset).to(device).eval()
        image = torch.rand(1, 3, 512, 512, device=device) * 2 - 1
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.amp):
            seconds = timed(lambda: model.decode(model.encode(image).mode()), device, args.warmup, args.repeats)
        print(f"{args.preset}: encode + decode of one 512x512 image: {seconds * 1000:.1f} ms")


def bench_tiles(args, device):
    if args.tile is not None:  # the child: one decode, its numbers as JSON
        model = autoencoder(args.preset).eval().to(device)
        f = model.downsampling_factor
        z = torch.randn(1, model.config["latent_channels"], args.resolution // f, args.resolution // f, device=device)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        with torch.no_grad():
            (sd.tiled_decode if args.tile == "on" else kl.AutoencoderKL.decode)(model, z)
        if device.type == "cuda":
            torch.cuda.synchronize()
            before, peak = 0, torch.cuda.max_memory_allocated(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"seconds": time.perf_counter() - t0, "before": before, "peak": peak}))
        return
    print(f"{describe(device)}; decoding one {args.resolution}x{args.resolution} image, preset {args.preset}, "
          f"float32, each in a fresh process")
    for tile in ("off", "on"):
        child = subprocess.run([sys.executable, __file__, "tiles", "--device", str(device), "--preset", args.preset,
                                "--resolution", str(args.resolution), "--tile", tile],
                               capture_output=True, text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
        where = "GPU peak allocated" if device.type == "cuda" else f"peak RSS (before decoding {r['before'] / 2 ** 30:.2f})"
        print(f"--tile {tile:<3}  {where}: {r['peak'] / 2 ** 30:6.2f} GiB  {r['seconds']:7.1f} s")


KL_SD = ["bench.py", "kl", "--preset", "sd", "--batch-size", "8", "--resolution", "256", "--repeats", "10"]
ONCE = ["--warmup", "0", "--repeats", "1"]  # --dry-run
CAMPAIGN = [  # (step, its command after `python`, the command's tiny version for --dry-run, minutes it may take)
    ("pytest -m cuda", ["-m", "pytest", "-m", "cuda", "-q"], ["-m", "pytest", "-m", "cuda", "-q"], 4),
    ("vae epoch: DataLoader loop, eager, one CUDA graph per step", ["bench.py", "vae", "--graph", "--repeats", "5"],
     ["bench.py", "vae", *ONCE], 3),
    ("vae epoch, compiled", ["bench.py", "vae", "--compile", "--repeats", "5"], ["bench.py", "vae", "--compile", *ONCE], 3),
    ("vae epoch, compiled, reduce-overhead", ["bench.py", "vae", "--compile", "--compile-mode", "reduce-overhead",
                                              "--repeats", "5"], ["bench.py", "vae", "--compile", "--compile-mode", "reduce-overhead", *ONCE], 3),
    ("kl step, sd, 256 x 256, fp32 vs diffusers fp32", KL_SD, ["bench.py", "kl", *ONCE], 2),
    ("kl step, bf16", KL_SD + ["--amp"], ["bench.py", "kl", "--amp", *ONCE], 2),
    ("kl step, bf16 + channels_last", KL_SD + ["--amp", "--channels-last"], ["bench.py", "kl", "--amp", "--channels-last", *ONCE], 2),
    ("kl step, bf16 + compile", KL_SD + ["--amp", "--compile"], ["bench.py", "kl", "--amp", "--compile", *ONCE], 3),
    ("tiled decode, sd, 2048 x 2048", ["bench.py", "tiles", "--preset", "sd", "--resolution", "2048"],
     ["bench.py", "tiles", "--resolution", "128"], 3),
    ("vae.py default run (100 epochs)", ["vae.py", "--out", "{out}/vae", "--overwrite"],
     ["vae.py", "--out", "{out}/vae", "--overwrite", "--epochs", "1", "--hidden", "16", "--eval-samples", "2"], 6),
]


def campaign(args):
    """Run CAMPAIGN's steps that have not yet succeeded, while --minutes allow; report each as it ends (a dry run
    into OUT/dry-run, apart from real results)."""
    args.out = os.path.abspath(os.path.join(args.out, "dry-run") if args.dry_run else args.out)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "report.json")
    with open(path) if os.path.exists(path) else contextlib.nullcontext() as f:
        report = json.load(f) if f else {"steps": {}}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"none ({platform.processor() or 'cpu'})"
    start = time.time()
    for step, command, tiny, minutes in CAMPAIGN:
        if report["steps"].get(step, {}).get("rc") == 0:  # done in an earlier call
            continue
        if (time.time() - start) / 60 + minutes > args.minutes:
            print(f"campaign: stopped before {step!r} (up to {minutes} min; --minutes {args.minutes}): call it again")
            break
        argv = [sys.executable, *[a.format(out=args.out) for a in (tiny if args.dry_run else command)]]
        if argv[1] != "-m":  # (pytest finds the GPU itself)
            mnist = "vae" in argv[1:3] or argv[1] == "vae.py"
            argv += ["--device", args.device] + ["--data-dir", os.path.abspath(args.data_dir)] * mnist
        print(f"campaign: {step}: {' '.join(argv[1:])}", flush=True)
        t0 = time.time()
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=minutes * 60,
                                    cwd=os.path.dirname(os.path.abspath(__file__)))  # where bench.py and vae.py are
            rc, output = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired as e:
            output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                             for part in (e.stdout, e.stderr))
            rc, output = "timeout", f"{output}\nstopped after {minutes} min"
        report["steps"][step] = {"command": "python " + " ".join(argv[1:]), "rc": rc, "gpu": gpu,
                                 "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
                                 "dry_run": args.dry_run, "output": output[-3000:]}
        vae.write_atomically(path, json.dumps(report, indent=1).encode())
        vae.write_atomically(os.path.join(args.out, "report.md"), "".join(
            f"## {name}\n`{r['command']}`: exit {r['rc']}, {r['seconds']} s, {r['gpu']}, torch {r['torch']}"
            f"{' (dry run)' if r['dry_run'] else ''}\n```\n{r['output'].strip()}\n```\n\n"
            for name, r in report["steps"].items()).encode())
        print(f"campaign: {step}: exit {rc} after {time.time() - t0:.0f} s", flush=True)


def main():
    p = argparse.ArgumentParser(description="Side-by-side timings; see the top of bench.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("what", nargs="?", default="vae", choices=["vae", "eval", "whole", "kl", "tiles", "campaign"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--amp", action="store_true", help="bf16 autocast for our side (CUDA, or a CPU with bf16 units)")
    p.add_argument("--compile", action="store_true", help="torch.compile vae.py's forward; kl: our encoder and decoder")
    g = p.add_argument_group("vae")
    g.add_argument("--data-dir", default="./data")
    g.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile's mode (reduce-overhead: CUDA graphs of the compiled parts)")
    g.add_argument("--graph", action="store_true", help="also vae.py's whole step, float32, in one CUDA graph")
    g.add_argument("--examples-vae", help="whole: pytorch/examples' vae/main.py")
    g.add_argument("--eval-samples", type=int, default=100, help="whole: vae.py's K of the test NLL")
    g = p.add_argument_group("kl")
    g.add_argument("--preset", default="tiny", choices=sorted(sd.PRESETS))
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--resolution", type=int, default=64)
    g.add_argument("--channels-last", action="store_true", help="channels_last memory for our side")
    g.add_argument("--tile", default=None, choices=["off", "on"], help=argparse.SUPPRESS)  # tiles: the child's side
    g = p.add_argument_group("campaign")
    g.add_argument("--out", default="runs/campaign", help="report.json, report.md and the runs' folders")
    g.add_argument("--minutes", type=float, default=9.0, help="start no step that might end after this")
    g.add_argument("--dry-run", action="store_true", help="every step at tiny sizes (on a CPU: to try the code)")
    args = p.parse_args()
    if args.what == "campaign":
        return campaign(args)
    try:
        device = vae.get_device(args.device)
    except vae.UserError as e:
        raise SystemExit(f"bench.py: error: {e}")
    if args.graph and device.type != "cuda":
        raise SystemExit("bench.py: error: --graph captures CUDA graphs: it needs --device cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    {"vae": bench_vae, "eval": bench_eval, "whole": bench_whole, "kl": bench_kl, "tiles": bench_tiles}[args.what](
        args, device)


if __name__ == "__main__":
    main()
