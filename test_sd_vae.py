"""sd_vae.py's specification, in the order of its source: every family's config and FLUX.2's model against diffusers',
LDM's names against diffusers' converter, the latent conventions against the pipelines, tiles against enable_tiling,
then its commands, with the user mistakes they answer in one line. Offline, on small models: nothing is downloaded."""

import copy
import json
import math
import os
import shlex

import numpy as np
import pytest
import torch
import torchvision

import kl_autoencoder as kl
import sd_vae as sd
from test_vae import (KL_CONFIGS, RunsCode, diffusers_autoencoder, kl_data, relative_error, smooth_images,  # noqa: F401
                      snapshot, tiny_model, tiny_weights, write_json, write_test_image)

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
FLUX2_CONFIG = {"_class_name": "AutoencoderKLFlux2", "block_out_channels": [32, 64], "decoder_block_out_channels": [32, 32],
                "layers_per_block": 1, "latent_channels": 8, "sample_size": 32, "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2}  # a FLUX.2-like VAE with a small decoder, small enough for the CPU


def sd_main(argv):
    """sd_vae.main; returns its result, or the exit code of a failed command."""
    try:
        return sd.main(argv)
    except SystemExit as e:
        return e.code


def sd_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sd_vae.py: error: "), err
    for word in words:
        assert word in err, err


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


def flux2_reference():
    """diffusers' AutoencoderKLFlux2 of FLUX2_CONFIG in float64, its 1-d parameters and bn's statistics drawn."""
    diffusers = pytest.importorskip("diffusers", minversion="0.38")  # AutoencoderKLFlux2 with decoder_block_out_channels
    torch.manual_seed(0)
    ref = with_drawn_vectors(diffusers.AutoencoderKLFlux2.from_config(FLUX2_CONFIG).double().eval())
    with torch.no_grad():
        ref.bn.running_mean.normal_()
        ref.bn.running_var.uniform_(0.2, 3.0)
    return ref


def built(config_or_preset):
    """sd_vae.py's model of a preset's name or of keywords (a config.json's, read), as the commands build it."""
    config = sd.PRESETS[config_or_preset] if isinstance(config_or_preset, str) else config_or_preset
    return kl.build(config, "test", sd.model_class(config))


def read(path):
    """The model of a config.json, as sd_vae.py builds it."""
    return built(sd.read_config(str(path)))


def ldm_state_dict(state, levels):
    """diffusers names -> CompVis/LDM names and shapes, written out here independently of sd_vae.py (and checked
    against diffusers' own converter in the test)."""
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


# ----------------------------------------------------------------------------- the families: presets, config.json, FLUX.2

@pytest.mark.parametrize("name", list(SD_CONFIGS))
def test_any_diffusers_config_builds_the_same_model_and_survives_export(tmp_path, name):
    diffusers = pytest.importorskip("diffusers")
    ref, config = diffusers_reference(name)
    ours = read(write_json(tmp_path / "in" / "config.json", {**config, "_diffusers_version": "0.42.1"}))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.double().load_state_dict(kl.fit_weights(ref.state_dict(), ours, "ref"))
    assert_same_model(ours, ref)
    kl.export(ours.float(), str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    reloaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "out"))
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "force_upcast", "mid_block_add_attention",
                "act_fn", "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "sample_size", "down_block_types",
                "up_block_types"):
        assert reloaded.config[key] == ref.config[key] or list(reloaded.config[key]) == list(ref.config[key]), key
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_presets_carry_the_published_latent_conventions():
    with torch.device("meta"):  # the modules and their config, without allocating weights
        models = {p: built(p) for p in ("sd", "sdxl", "sd3", "flux")}
    assert {p: (m.config["scaling_factor"], m.config["shift_factor"]) for p, m in models.items()} == {
        "sd": (0.18215, None), "sdxl": (0.13025, None), "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
    for p in ("sd3", "flux"):
        model = models[p]
        assert model.quant_conv is None and model.post_quant_conv is None and model.config["latent_channels"] == 16
    assert models["sdxl"].config["force_upcast"] and models["sdxl"].config["sample_size"] == 1024


def test_flux2_configs_build_diffusers_model_key_for_key_and_survive_export(tmp_path):
    """An AutoencoderKLFlux2 config.json builds diffusers' model: the same state dict (bn's statistics, the narrower
    decoder), the same posterior and decoding in float64; exported, diffusers loads it as AutoencoderKLFlux2 and we read
    the same config back; LDM's names keep bn's. Bad values of its fields are one line."""
    diffusers = pytest.importorskip("diffusers", minversion="0.38")
    ref = flux2_reference()
    ours = read(write_json(tmp_path / "in" / "config.json", FLUX2_CONFIG)).double()
    assert isinstance(ours, sd.AutoencoderKLFlux2) and ours.decoder.conv_out.weight.shape[1] == 32
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(kl.fit_weights(ref.state_dict(), ours, "ref"))
    assert_same_model(ours, ref)
    kl.export(ours.float(), str(tmp_path / "out" / "diffusion_pytorch_model.safetensors"))
    reloaded = diffusers.AutoencoderKLFlux2.from_pretrained(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["_class_name"] == "AutoencoderKLFlux2"
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert read(tmp_path / "out").config == ours.config
    ldm = sd.to_ldm(ours.state_dict(), ours)  # LDM's names: bn's keep theirs
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "decoder.up.1.block.0.conv1.weight"} <= ldm.keys()
    assert all(torch.equal(t, ours.state_dict()[k]) for k, t in sd.diffusers_names(ldm, ours).items())
    for bad, words in [({"decoder_block_out_channels": [32]}, "describes no model"),
                       ({"decoder_block_out_channels": [32, 48]}, "describes no model"),
                       ({"batch_norm_eps": 0}, "latent convention"), ({"patch_size": [2]}, "describes no model")]:
        with pytest.raises(kl.UserError, match=words):
            read(write_json(tmp_path / "bad.json", {**FLUX2_CONFIG, **bad}))


def test_the_flux2_preset_is_autoencoderklflux2s_published_config(tmp_path):
    """FLUX.2's config is diffusers' AutoencoderKLFlux2 defaults (32 latent channels, quant convs, bn over 128); a
    config.json that names the class and nothing else gives them too."""
    diffusers = pytest.importorskip("diffusers", minversion="0.38")
    with torch.device("meta"):
        theirs, ours = diffusers.AutoencoderKLFlux2(), built("flux2")
        only_the_class = read(write_json(tmp_path / "c.json", {"_class_name": "AutoencoderKLFlux2"}))
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert {k: v for k, v in kl.diffusers_config(ours).items() if k != "_class_name"} == \
        {k: list(v) if isinstance(v, tuple) else v for k, v in theirs.config.items() if not k.startswith("_")}
    assert ours.bn.eps == 1e-4 and ours.bn.num_features == 128 and ours.quant_conv is not None
    assert only_the_class.config == ours.config


def test_a_diffusers_folder_or_its_file_brings_its_own_config(tmp_path, capsys):
    """A diffusers folder, or its diffusion_pytorch_model file, is read with the config.json beside it; so is the folder
    of older diffusers, whose weights are a pickled diffusion_pytorch_model.bin."""
    torch.manual_seed(0)
    model = built({**SD_CONFIGS["flux-like"], "block_out_channels": (32, 64)})
    kl.export(model, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "old").mkdir()
    os.rename(tmp_path / "vae" / "config.json", tmp_path / "old" / "config.json")
    torch.save(model.state_dict(), str(tmp_path / "old" / "diffusion_pytorch_model.bin"))
    kl.export(model, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    write_test_image(tmp_path / "in.png", 16, 16)
    images = []
    for weights in ("vae", os.path.join("vae", "diffusion_pytorch_model.safetensors"), "old"):
        sd.main(["reconstruct", "--weights", str(tmp_path / weights), "--image", str(tmp_path / "in.png"), "--out",
                 str(tmp_path / "o.png"), "--device", "cpu", "--overwrite"])
        assert "latent [1, 16, 8, 8]" in capsys.readouterr().out  # 16 channels, f = 2: the folder's config, not sd's
        images.append((tmp_path / "o.png").read_bytes())
    assert images[0] == images[1] == images[2]  # the same weights, from each


# ----------------------------------------------------------------------------- LDM's names

@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_community_vae_files_with_their_trainings_leftovers_and_ema_copies_load(fmt, tmp_path, capsys):
    """A VAE file as LDM's first-stage training writes it (and community files such as vae-ft-mse-840000-ema keep):
    LDM names, the loss's networks (loss.*), LitEma's counters and its copies of every weight (model_ema. + the name
    without dots). The leftovers are ignored with one line, the weights load, --ema loads the copies instead; an
    unknown key is still refused."""
    torch.manual_seed(0)
    weights, copies = tiny_model(), tiny_model()
    state = {**sd.to_ldm(weights.state_dict(), weights), "loss.logvar": torch.zeros(()),
             "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4),
             "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000, dtype=torch.int32),
             **{"model_ema." + k.replace(".", ""): v for k, v in sd.to_ldm(copies.state_dict(), copies).items()},
             "model_ema.losslogvar": torch.zeros(())}  # LitEma copies every parameter of LDM's model, the loss's too
    path = str(tmp_path / f"vae.{fmt}")
    torch.save({"state_dict": state}, path) if fmt == "ckpt" else kl.save_safetensors(state, path)
    for ema, expected in ((False, weights), (True, copies)):
        loaded = sd.read_weights(path, tiny_model(), ema=ema)
        assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.items())
        note = capsys.readouterr().err
        assert "ignored 6 tensors of its training (loss.discriminator, loss.logvar, loss.perceptual_loss, " \
               "model_ema.decay, model_ema.losslogvar, model_ema.num_updates)" in note
        assert ("loaded its EMA weights" if ema else "not the EMA's (124 tensors; --ema loads them)") in note
    torch.save({"state_dict": {**state, "lossy.weight": torch.zeros(1)}}, str(tmp_path / "extra.ckpt"))
    with pytest.raises(kl.UserError, match="1 unexpected, e.g. lossy.weight"):
        sd.read_weights(str(tmp_path / "extra.ckpt"), tiny_model())
    kl.save_safetensors(sd.to_ldm(weights.state_dict(), weights), str(tmp_path / "plain.safetensors"))
    with pytest.raises(kl.UserError, match="no EMA weights"):
        sd.read_weights(str(tmp_path / "plain.safetensors"), tiny_model(), ema=True)


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
            ours = read(tmp_path / "config.json").double()
            ours.load_state_dict(sd.read_weights(path, ours))
            assert_same_model(ours, ref)


def test_ldm_names_cover_every_weight_and_name_it_as_diffusers_converter_expects():
    for preset in ("sd", "sd3"):
        with torch.device("meta"):
            model = built(preset)
        table = sd.ldm_names(model)
        ldm = ldm_state_dict(model.state_dict(), 4)
        assert set(table) == set(model.state_dict()) and sorted(table.values()) == sorted(ldm)
        exported = sd.to_ldm(model.state_dict(), model)
        assert all(exported[k].shape == v.shape for k, v in ldm.items())  # attention as [C, C, 1, 1]
    assert exported["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


def test_attention_levels_have_ldms_names_and_load_from_an_ldm_file(tmp_path):
    """LDM's kl-f32-style levels: encoder.down.{i}.attn.{j} and decoder.up.{levels - 1 - i}.attn.{j} (norm, q, k, v,
    proj_out; the matrices [C, C, 1, 1]), as LDM's model.py names them (diffusers' own converter skips them)."""
    ref, config = diffusers_reference("attention-levels")
    ldm = ldm_state_dict(ref.state_dict(), 3)
    assert "encoder.down.2.attn.0.q.weight" in ldm and "decoder.up.2.attn.1.proj_out.weight" in ldm
    assert not any(k.startswith(("encoder.down.0.attn", "decoder.up.0.attn")) for k in ldm)
    ours = read(write_json(tmp_path / "config.json", config)).double()
    exported = sd.to_ldm(ours.state_dict(), ours)
    assert exported.keys() == ldm.keys() and all(exported[k].shape == v.shape for k, v in ldm.items())
    kl.save_safetensors({"first_stage_model." + k: v for k, v in ldm.items()}, str(tmp_path / "vae.safetensors"))
    ours.load_state_dict(sd.read_weights(str(tmp_path / "vae.safetensors"), ours))
    assert_same_model(ours, ref)


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
    ours = tiny_model().eval()
    ours.load_state_dict(sd.diffusers_names(legacy, ours))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert relative_error(ours(x), ref(x).sample) <= 1e-5


def test_ldm_export_loads_in_diffusers_from_single_file_and_back_here(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ref, config = diffusers_reference("flux-like")
    write_json(tmp_path / "cfg" / "config.json", config)
    kl.export(read(tmp_path / "cfg"), str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))  # its random weights
    kl.save_safetensors(ref.float().state_dict(), str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    sd.main(["convert", "--weights", str(tmp_path / "vae"), "--export-format", "ldm", "--export",  # (into the folder:
             str(tmp_path / "vae" / "vae_ldm.safetensors")])  # one file, no config.json over the folder's)
    assert "decoder.up.0.block.0.conv1.weight" in kl.load_safetensors(str(tmp_path / "vae" / "vae_ldm.safetensors"))
    theirs = diffusers.AutoencoderKL.from_single_file(str(tmp_path / "vae" / "vae_ldm.safetensors"), config=str(tmp_path / "cfg"),
                                                      local_files_only=True)
    assert all(torch.equal(theirs.state_dict()[k], v.float()) for k, v in ref.state_dict().items())
    again = read(tmp_path / "cfg")
    again.load_state_dict(sd.read_weights(str(tmp_path / "vae" / "vae_ldm.safetensors"), again))
    assert all(torch.equal(again.state_dict()[k], v.float()) for k, v in ref.state_dict().items())


# ----------------------------------------------------------------------------- latents for diffusion models, tiles

@pytest.mark.parametrize("name", list(SD_CONFIGS))
def test_diffusion_latents_follow_diffusers_pipelines(name):
    config = built(SD_CONFIGS[name]).config
    z = torch.randn(3, config["latent_channels"], 4, 5, dtype=torch.float64)
    model_z = sd.to_diffusion_latents(z, config)
    # what diffusers' pipelines do: SD3/Flux (z - shift) * scale; SDXL with latents_mean/std (z - mean) * scale / std
    if config["latents_mean"] is not None:
        mean, std = (torch.tensor(config[k], dtype=torch.float64).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
        expected = (z - mean) * config["scaling_factor"] / std
    else:
        expected = (z - (config["shift_factor"] or 0)) * config["scaling_factor"]
    assert torch.allclose(model_z, expected, rtol=1e-14, atol=0)
    assert torch.allclose(sd.from_diffusion_latents(model_z, config), z, rtol=1e-13, atol=1e-14)


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
    config = {"patch_size": (2, 2)}
    model_z = sd.to_diffusion_latents(z, config, bn)
    assert model_z.shape == (3, 32, 3, 5) and torch.equal(model_z, expected)
    back = sd.from_diffusion_latents(model_z, config, bn)
    theirs = (model_z * std + mean).reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)
    assert torch.equal(back, theirs) and torch.allclose(back, z, rtol=0, atol=1e-14)


@pytest.mark.parametrize("h, w", [(80, 56), (96, 96), (40, 40), (32, 24)])
def test_tiled_encode_and_decode_equal_diffusers_tiling(h, w):
    ref, _ = diffusers_reference("sd-like", sample_size=32)
    ours = built({**SD_CONFIGS["sd-like"], "sample_size": 32}).double().eval()
    ours.load_state_dict(ref.state_dict())
    ref.enable_tiling()
    ref.enable_slicing()  # one image at a time, which must change nothing
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, h, w, dtype=torch.float64, generator=g) * 2 - 1
    z = torch.randn(2, 4, h // 4, w // 4, dtype=torch.float64, generator=g)
    with torch.no_grad():
        posterior, theirs = sd.tiled_encode(ours, x), ref.encode(x).latent_dist
        decoded = sd.tiled_decode(ours, z)
        assert relative_error(posterior.mean, theirs.mean) <= 1e-12 and relative_error(posterior.logvar, theirs.logvar) <= 1e-12
        assert relative_error(decoded, ref.decode(z).sample) <= 1e-12
        # and the tiles are real: whole-image encoding and decoding differ from them, except for images that fit one tile
        if max(h, w) > 32:
            assert relative_error(ours.encode(x).mean, posterior.mean) > 1e-3
            assert relative_error(ours.decode(z), decoded) > 1e-3
        else:
            assert torch.equal(ours.encode(x).mean, posterior.mean) and torch.equal(ours.decode(z), decoded)


# ----------------------------------------------------------------------------- the commands

def test_reconstruct_end_to_end(tiny_weights, tmp_path, capsys):
    """kl_autoencoder.py's plain reconstruct and sd_vae.py's (with tiles, a dtype, timings) write the same image, and
    the PSNR printed is that of the written file against the input."""
    write_test_image(tmp_path / "in.png", 24, 32)
    argv = ["reconstruct", "--weights", tiny_weights, "--preset", "tiny", "--image", str(tmp_path / "in.png"), "--device",
            "cpu"]
    quality = kl.main([*argv, "--out", str(tmp_path / "out.png")])
    assert "latent [1, 4, 12, 16]" in capsys.readouterr().out
    assert sd.main([*argv, "--out", str(tmp_path / "sd.png")]) == quality
    assert (tmp_path / "sd.png").read_bytes() == (tmp_path / "out.png").read_bytes()
    out = torchvision.io.read_image(str(tmp_path / "out.png"))
    x = torchvision.io.read_image(str(tmp_path / "in.png")).float() / 255
    assert out.shape == (3, 24, 32) and quality == pytest.approx(10 * math.log10(1 / (out.float() / 255 - x).pow(2).mean().item()), abs=1e-5)


@pytest.mark.parametrize("tile, limit, size, tiled", [("on", None, 16, True), ("off", 1, 16, False), ("auto", 1919, 16, True),
                                                     ("auto", 1920, 16, False), ("on", None, 48, False)])  # 48: one tile
def test_reconstruct_tiles_when_asked_or_above_the_auto_size(tiny_weights, tmp_path, capsys, monkeypatch, tile, limit, size, tiled):
    """--tile auto tiles images of strictly more pixels than AUTO_TILE_PIXELS (48 x 40 = 1,920: above 1,919, not
    above 1,920); the written image is the tiled (or whole) encoding and decoding."""
    if limit is not None:
        monkeypatch.setattr(sd, "AUTO_TILE_PIXELS", limit)
    write_test_image(tmp_path / "in.png", 48, 40)  # tiles of size x size
    config = write_json(tmp_path / "cfg" / "config.json", {**kl.PRESETS["tiny"], "sample_size": size})
    sd.main(["reconstruct", "--weights", tiny_weights, "--config", config, "--image", str(tmp_path / "in.png"),
             "--out", str(tmp_path / "out.png"), "--device", "cpu", "--tile", tile])
    assert (", tiled" in capsys.readouterr().out) == tiled
    model = read(config).eval()
    model.load_state_dict(kl.load_safetensors(tiny_weights))
    with torch.no_grad():
        x = kl.decode_image(str(tmp_path / "in.png"))[None].float() / 127.5 - 1
        expected = kl.to_uint8((sd.tiled_decode if tiled else kl.AutoencoderKL.decode)(
            model, (sd.tiled_encode if tiled else kl.AutoencoderKL.encode)(model, x).mode())[0])
    assert (torchvision.io.read_image(str(tmp_path / "out.png")).int() - expected.int()).abs().max() <= 1


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_tile_auto_tiles_encode_and_decode_above_1024_x_1024_pixels(command, tiny_weights, tmp_path, monkeypatch):
    """The threshold of --tile auto is the same in encode and decode: the image's pixels (decode: the latents' times
    f^2), strictly more than 1024 x 1024 (the default). Counted here by which encoder or decoder runs, on a 32 x 32
    image (1,024 pixels) with the threshold moved to 1,023 and 1,024."""
    calls = []
    monkeypatch.setattr(sd, "tiled_encode", lambda model, x: calls.append("tiled") or kl.AutoencoderKL.encode(model, x))
    monkeypatch.setattr(sd, "tiled_decode", lambda model, z: calls.append("tiled") or kl.AutoencoderKL.decode(model, z))
    (tmp_path / "imgs").mkdir()
    write_test_image(tmp_path / "imgs" / "a.png", 32, 32)
    common = ["--weights", tiny_weights, "--preset", "tiny", "--device", "cpu", "--overwrite"]
    sd.main(["encode", *common, "--data", str(tmp_path / "imgs"), "--resolution", "32", "--out", str(tmp_path / "l.safetensors")])
    assert sd.AUTO_TILE_PIXELS == 1024 * 1024 and calls == []
    for limit, tiled in ((1023, True), (1024, False)):
        monkeypatch.setattr(sd, "AUTO_TILE_PIXELS", limit)
        calls.clear()
        sd.main([command, *common, "--out", str(tmp_path / ("l.safetensors" if command == "encode" else "d"))] +
                (["--data", str(tmp_path / "imgs"), "--resolution", "32"] if command == "encode" else
                 ["--latents", str(tmp_path / "l.safetensors")]))
        assert calls == ["tiled"] * tiled, (limit, calls)


def test_reconstruct_overwrites_only_when_asked(tiny_weights, tmp_path):
    write_test_image(tmp_path / "in.png", 32, 32)
    (tmp_path / "out.jpg").write_bytes(b"old")
    argv = ["reconstruct", "--weights", tiny_weights, "--preset", "tiny", "--image", str(tmp_path / "in.png"),
            "--out", str(tmp_path / "out.jpg"), "--device", "cpu"]
    assert sd_main(argv) == 2 and (tmp_path / "out.jpg").read_bytes() == b"old"
    sd.main([*argv, "--overwrite"])
    assert torchvision.io.read_image(str(tmp_path / "out.jpg")).shape == (3, 32, 32)  # a JPEG now
    assert sorted(os.listdir(tmp_path)) == ["in.png", "out.jpg"]


def test_encode_and_decode_commands_round_trip(tiny_weights, tmp_path, capsys):
    folder = tmp_path / "images" / "sub"
    folder.mkdir(parents=True)
    for i in range(3):
        torchvision.io.write_png(torch.from_numpy(smooth_images(1, 32, seed=i)[0]).permute(2, 0, 1).contiguous(), str(folder / f"{i}.png"))
    common = ["--weights", tiny_weights, "--preset", "tiny", "--device", "cpu"]
    sd.main(["encode", *common, "--data", str(tmp_path / "images"), "--resolution", "32", "--batch-size", "2", "--out", str(tmp_path / "lat.safetensors")])
    saved, meta = kl.load_safetensors(str(tmp_path / "lat.safetensors"), metadata=True)
    assert json.loads(meta["names"]) == [os.path.join("sub", f"{i}.png") for i in range(3)]
    model = tiny_model().eval()
    model.load_state_dict(kl.load_safetensors(tiny_weights))
    x = torch.stack([kl.decode_image(str(folder / f"{i}.png")).float() / 127.5 - 1 for i in range(3)])
    with torch.no_grad():
        posterior = model.encode(x)
    assert torch.allclose(saved["mean"], posterior.mean, atol=1e-5) and torch.allclose(saved["logvar"], posterior.logvar, atol=1e-5)
    assert torch.allclose(saved["latents"], posterior.mean * 0.18215, atol=1e-5)  # tiny keeps SD's scaling factor
    sd.main(["decode", *common, "--latents", str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "decoded")])
    for i in range(3):
        sd.main(["reconstruct", *common, "--image", str(folder / f"{i}.png"), "--out", str(tmp_path / f"rec{i}.png")])
        decoded = torchvision.io.read_image(str(tmp_path / "decoded" / "sub" / f"{i}.png")).int()
        assert (decoded - torchvision.io.read_image(str(tmp_path / f"rec{i}.png")).int()).abs().max() <= 1
    # --sample: another z, the same posterior
    sd.main(["encode", *common, "--data", str(tmp_path / "images"), "--resolution", "32", "--batch-size", "2", "--sample",
             "--out", str(tmp_path / "s.safetensors")])
    sampled = kl.load_safetensors(str(tmp_path / "s.safetensors"))
    assert torch.allclose(sampled["mean"], saved["mean"], atol=1e-6)
    g = torch.Generator().manual_seed(0)  # --seed 0, batches of 2 and 1
    eps = torch.cat([torch.randn(2, *saved["mean"].shape[1:], generator=g), torch.randn(1, *saved["mean"].shape[1:],
                                                                                         generator=g)])
    z = saved["mean"] + torch.exp(0.5 * saved["logvar"]) * eps
    assert torch.allclose(sampled["latents"], z * 0.18215, atol=1e-5) and not torch.allclose(z, saved["mean"], atol=0.1)


@pytest.mark.parametrize("field", ["scaling_factor", "shift_factor", "latents_mean_std"])
def test_decode_takes_the_latents_back_with_the_convention_of_their_file(field, tiny_weights, tmp_path):
    """decode undoes the convention a latents file names in its metadata (its scaling factor, shift, per-channel mean
    and std), over the model's own: latents written with another convention decode to the same images as the model's
    own latents of the same z."""
    torch.manual_seed(0)
    z = torch.randn(2, 4, 8, 8)
    model_config = built("tiny").config  # the model's: z * 0.18215
    other = {"scaling_factor": {"scaling_factor": 0.5}, "shift_factor": {"shift_factor": 0.3},
             "latents_mean_std": {"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [1.5, 2.0, 0.5, 1.0]}}[field]
    for name, config in (("own", {}), ("other", other)):
        latents = sd.to_diffusion_latents(z, {**model_config, **config})
        kl.save_safetensors({"latents": latents}, str(tmp_path / f"{name}.safetensors"),
                            metadata={"config": json.dumps(config)})
        sd.main(["decode", "--weights", tiny_weights, "--preset", "tiny", "--device", "cpu", "--latents",
                 str(tmp_path / f"{name}.safetensors"), "--out", str(tmp_path / name)])
    assert not torch.allclose(sd.to_diffusion_latents(z, {**model_config, **other}), sd.to_diffusion_latents(z, model_config))
    for i in range(2):
        own, theirs = (torchvision.io.read_image(str(tmp_path / d / f"{i:06d}.png")).int() for d in ("own", "other"))
        assert (own - theirs).abs().max() <= 1


def test_flux2_encode_and_decode_commands_round_trip(tiny_weights, tmp_path, capsys):
    """encode writes FLUX.2's diffusion latents (patchified: 4 C channels at half the latent size) and the statistics it
    used; decode takes them back with those (also when the model's have changed since, as in a fine-tune) to the images
    reconstruct makes; an image side the patches do not divide, and FLUX.2 latents given to another model, are one
    line each."""
    torch.manual_seed(0)
    model = read(write_json(tmp_path / "c.json", FLUX2_CONFIG))
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.2, 3.0)
    kl.export(model, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "images").mkdir()
    write_test_image(tmp_path / "images" / "a.png", 32, 32)
    common = ["--weights", str(tmp_path / "vae"), "--device", "cpu"]
    sd.main(["encode", *common, "--data", str(tmp_path / "images"), "--out", str(tmp_path / "lat.safetensors")])
    saved = kl.load_safetensors(str(tmp_path / "lat.safetensors"))
    assert saved["latents"].shape == (1, 32, 8, 8) and saved["mean"].shape == (1, 8, 16, 16)
    assert torch.allclose(saved["latents"], sd.to_diffusion_latents(saved["mean"], model.config, model.bn), atol=1e-6)
    assert torch.equal(saved["bn.running_var"], model.bn.running_var)  # the statistics it was standardised with
    sd.main(["decode", *common, "--latents", str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "dec")])
    sd.main(["reconstruct", *common, "--image", str(tmp_path / "images" / "a.png"), "--out", str(tmp_path / "rec.png")])
    decoded = torchvision.io.read_image(str(tmp_path / "dec" / "a.png")).int()
    assert (decoded - torchvision.io.read_image(str(tmp_path / "rec.png")).int()).abs().max() <= 1
    state = kl.load_safetensors(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    kl.save_safetensors({**state, "bn.running_mean": state["bn.running_mean"] + 1},
                        str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    sd.main(["decode", *common, "--latents", str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "dec2")])
    assert torch.equal(torchvision.io.read_image(str(tmp_path / "dec2" / "a.png")).int(), decoded)
    kl.save_safetensors({**saved, "bn.running_mean": saved["bn.running_mean"][:1]}, str(tmp_path / "one.safetensors"))
    assert sd_main(["decode", *common, "--latents", str(tmp_path / "one.safetensors"), "--out", str(tmp_path / "d1")]) == 2
    sd_error(capsys, "bn.running_mean and bn.running_var are not one number per channel")
    kl.save_safetensors({**state, "bn.running_var": -state["bn.running_var"]},  # variances < 0: NaN latents, refused
                        str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    assert sd_main(["encode", *common, "--data", str(tmp_path / "images"), "--out", str(tmp_path / "n.safetensors")]) == 2
    sd_error(capsys, "the latents hold NaN")
    assert sd_main(["encode", *common, "--data", str(tmp_path / "images"), "--resolution", "30", "--out",
                    str(tmp_path / "x.safetensors")]) == 2
    sd_error(capsys, "--resolution 30", "multiple of 4")
    assert sd_main(["decode", "--weights", tiny_weights, "--preset", "tiny", "--device", "cpu", "--latents",
                    str(tmp_path / "lat.safetensors"), "--out", str(tmp_path / "sd")]) == 2
    sd_error(capsys, "[1, 32, 8, 8]", "(N, 4, h, w)")


def test_fp16_is_upcast_where_the_config_says_so(tiny_weights, tmp_path, capsys):
    write_test_image(tmp_path / "in.png", 16, 16)
    args = ["reconstruct", "--weights", tiny_weights, "--image", str(tmp_path / "in.png"), "--device", "cpu"]
    upcast = write_json(tmp_path / "up" / "config.json", {**kl.PRESETS["tiny"], "force_upcast": True})
    assert sd.main([*args, "--config", upcast, "--dtype", "fp16", "--out", str(tmp_path / "a.png")]) == \
        sd.main([*args, "--config", upcast, "--dtype", "fp32", "--out", str(tmp_path / "b.png")])
    assert "force_upcast" in capsys.readouterr().err
    plain = write_json(tmp_path / "plain" / "config.json", {**kl.PRESETS["tiny"], "force_upcast": False})
    sd.main([*args, "--config", plain, "--dtype", "fp16", "--out", str(tmp_path / "c.png")])
    assert "float16" in capsys.readouterr().out
    flux2 = read(write_json(tmp_path / "flux2" / "config.json", FLUX2_CONFIG))  # FLUX.2's has no force_upcast: upcast,
    kl.export(flux2, str(tmp_path / "flux2" / "diffusion_pytorch_model.safetensors"))  # as diffusers' pipelines do
    sd.main([*args[:1], "--weights", str(tmp_path / "flux2"), *args[3:], "--dtype", "fp16", "--out", str(tmp_path / "d.png")])
    assert "force_upcast" in capsys.readouterr().err


def test_compile_compiles_the_encoder_and_the_decoder_themselves(tiny_weights, tmp_path, monkeypatch):
    """--compile in reconstruct, encode and decode compiles model.encoder and model.decoder, which encode() and decode()
    call (compiling forward would leave them eager), and nothing without it. (A real compile on this CPU takes 27 s
    for the tiny model; measured once: outputs within 7.7e-6 of eager, of values up to 1.8.)"""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    (tmp_path / "imgs").mkdir()
    write_test_image(tmp_path / "imgs" / "in.png", 16, 16)
    common = ["--weights", tiny_weights, "--preset", "tiny", "--device", "cpu", "--overwrite"]
    lat = str(tmp_path / "lat.safetensors")
    for flags in ([], ["--compile"]):
        sd.main(["reconstruct", *common, "--image", str(tmp_path / "imgs" / "in.png"), "--out", str(tmp_path / "r.png"), *flags])
        sd.main(["encode", *common, "--data", str(tmp_path / "imgs"), "--resolution", "16", "--out", lat, *flags])
        sd.main(["decode", *common, "--latents", lat, "--out", str(tmp_path / "d"), *flags])
        assert compiled == ["Encoder", "Decoder"] * 3 * bool(flags), compiled


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
        sd.main(["reconstruct", *common, "--image", str(tmp_path / "imgs" / "in.png"), "--dtype", dtype,
                 "--out", str(tmp_path / f"rec_{dtype}.png")])
        sd.main(["encode", *common, "--data", str(tmp_path / "imgs"), "--resolution", "16", "--dtype", dtype,
                 "--out", str(tmp_path / f"lat_{dtype}.safetensors")])
        sd.main(["decode", *common, "--latents", str(tmp_path / "lat_fp32.safetensors"), "--dtype", dtype,
                 "--out", str(tmp_path / f"dec_{dtype}")])
        notes = capsys.readouterr().err
        assert notes.count("overflowed in float16") == (3 if dtype == "fp16" else 0), notes
    assert (tmp_path / "rec_fp16.png").read_bytes() == (tmp_path / "rec_fp32.png").read_bytes()
    assert (tmp_path / "dec_fp16" / "in.png").read_bytes() == (tmp_path / "dec_fp32" / "in.png").read_bytes()
    latents = [kl.load_safetensors(str(tmp_path / f"lat_{d}.safetensors"))["latents"] for d in ("fp16", "fp32")]
    assert torch.equal(*latents) and torch.isfinite(latents[0]).all()


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
    sd.main(["decode", "--weights", tiny_weights, "--preset", "tiny", "--device", "cpu", "--latents", path, "--out", str(tmp_path / "out")])
    assert sorted(os.path.relpath(os.path.join(d, f), tmp_path / "out") for d, _, files in os.walk(tmp_path / "out")
                  for f in files) == written and not (tmp_path / "escaped.png").exists()


def test_the_safetensors_files_sd_vae_writes_open_in_the_safetensors_package(tiny_weights, tmp_path):
    """Latents and an LDM export: the package reads every tensor as we do, the header is padded to 8 bytes, and the
    metadata are strings (JSON where they hold structure)."""
    safetensors = pytest.importorskip("safetensors")
    (tmp_path / "images").mkdir()
    write_test_image(tmp_path / "images" / "a.png", 32, 32)
    common = ["--weights", tiny_weights, "--preset", "tiny", "--device", "cpu"]
    sd.main(["encode", *common, "--data", str(tmp_path / "images"), "--resolution", "32", "--out", str(tmp_path / "lat.safetensors")])
    sd.main(["convert", *common, "--export-format", "ldm", "--export", str(tmp_path / "ldm.safetensors")])
    for path in (tmp_path / "lat.safetensors", tmp_path / "ldm.safetensors"):
        assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0, path
        ours = kl.load_safetensors(str(path))
        with safetensors.safe_open(str(path), framework="pt") as f:
            assert sorted(f.keys()) == sorted(ours) and all(torch.equal(f.get_tensor(k), ours[k]) for k in ours), path
            metadata = f.metadata()
        assert metadata["format"] == "pt" and all(isinstance(v, str) for v in metadata.values()), path
        assert json.loads(metadata["config"]) == kl.diffusers_config(built("tiny")), path  # the model, in diffusers' words


def test_fine_tuning_an_ldm_file_in_two_commands_and_flux2_in_one(kl_data, tmp_path):
    """An LDM-named .ckpt: `sd_vae.py convert`, then `kl_autoencoder.py train --weights` the converted folder, starts
    from its weights (the same, with the learning rate 1e-12); sd_vae.py's train takes the .ckpt and a FLUX.2 folder
    directly, and its eval and convert read the run's checkpoint (FLUX.2's bn kept as it was)."""
    torch.manual_seed(3)
    start = tiny_model().state_dict()
    ldm = str(tmp_path / "start.ckpt")
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in ldm_state_dict(start, 2).items()}}, ldm)
    sd.main(["convert", "--weights", ldm, "--preset", "tiny", "--export", str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")])
    train = ["train", "--data", kl_data, "--resolution", "32", "--batch-size", "8", "--val-size", "16", "--device", "cpu",
             "--perceptual-weight", "0", "--disc-weight", "0", "--steps", "1", "--lr", "1e-12", "--eval-every", "0"]
    kl.main([*train, "--weights", str(tmp_path / "vae"), "--out", str(tmp_path / "run")])
    sd.main([*train, "--weights", ldm, "--preset", "tiny", "--out", str(tmp_path / "run_sd")])
    for run in ("run", "run_sd"):
        trained = torch.load(str(tmp_path / run / "ckpt.pt"), weights_only=True)["model"]
        assert all(torch.allclose(trained[k], v, atol=1e-8) for k, v in start.items()), run
    flux2 = read(write_json(tmp_path / "c.json", FLUX2_CONFIG))
    with torch.no_grad():
        flux2.bn.running_mean.normal_()
    kl.export(flux2, str(tmp_path / "flux2" / "diffusion_pytorch_model.safetensors"))
    sd.main([*train, "--weights", str(tmp_path / "flux2"), "--out", str(tmp_path / "run_flux2")])
    record = sd.main(["eval", "--ckpt", str(tmp_path / "run_flux2" / "ckpt.pt"), "--device", "cpu", "--out", str(tmp_path / "ev")])
    assert record["images"] == 16
    sd.main(["convert", "--ckpt", str(tmp_path / "run_flux2" / "ckpt.pt"), "--export", str(tmp_path / "out" / "diffusion_pytorch_model.safetensors")])
    exported = read(tmp_path / "out")
    exported.load_state_dict(kl.load_safetensors(str(tmp_path / "out" / "diffusion_pytorch_model.safetensors")))
    assert isinstance(exported, sd.AutoencoderKLFlux2) and torch.equal(exported.bn.running_mean, flux2.bn.running_mean)


# ----------------------------------------------------------------------------- user mistakes: one line on stderr, exit code 2, nothing written

@pytest.fixture(scope="module")
def sd_inputs(tmp_path_factory, tiny_weights):
    d = tmp_path_factory.mktemp("sd_inputs")
    (d / "imgs").mkdir()
    write_test_image(d / "imgs" / "a.png", 32, 32)
    write_test_image(d / "in32.png", 32, 32)
    shutil_copy(tiny_weights, d / "tiny.safetensors")
    state = kl.load_safetensors(tiny_weights)
    torch.save({"state_dict": state, "callbacks": RunsCode(str(d / "ran"))}, str(d / "evil.ckpt"))  # would make {d}/ran
    (d / "text.ckpt").write_text("hello")
    kl.save_safetensors({**state, "encoder.conv_in.weight": state["encoder.conv_in.weight"] * 1e38},  # finite, and so
                        str(d / "overflow.safetensors"))  # large that the activations are not
    one_nan = torch.zeros(1, 4, 4, 4).index_put_((torch.tensor(0),) * 4, torch.tensor(float("nan")))  # one is enough
    for name, latents, meta in (("nolat", {"other": torch.zeros(1)}, {}), ("lat16", {"latents": torch.zeros(1, 16, 4, 4)}, {}),
                                ("lat", {"latents": torch.zeros(1, 4, 4, 4)}, {}),
                                ("lat0", {"latents": torch.zeros(0, 4, 4, 4)}, {}), ("latnan", {"latents": one_nan}, {}),
                                ("latscale0", {"latents": torch.zeros(1, 4, 4, 4)}, {"config": json.dumps({"scaling_factor": 0})}),
                                ("latlist", {"latents": torch.zeros(1, 4, 4, 4)}, {"config": "[1, 2]"})):
        kl.save_safetensors(latents, str(d / f"{name}.safetensors"), metadata=meta)
    (d / "decoded").mkdir()
    (d / "decoded" / "000000.png").write_bytes(b"mine")
    kl.export(tiny_model(in_channels=1), str(d / "grey" / "diffusion_pytorch_model.safetensors"))
    config = json.loads(json.dumps(kl.diffusers_config(tiny_model())))
    for name, change in {"scale0": {"scaling_factor": 0}, "mean3": {"latents_mean": [1, 2, 3], "latents_std": [1] * 4},
                         "meannum": {"latents_mean": 0.5, "latents_std": [1] * 4},
                         "flux2bad": {"_class_name": "AutoencoderKLFlux2", "patch_size": [2]}}.items():
        write_json(d / f"c_{name}.json", {**config, **change})
    return {"d": str(d)}


def shutil_copy(a, b):
    with open(a, "rb") as f, open(b, "wb") as g:
        g.write(f.read())


W = "--weights {d}/tiny.safetensors --preset tiny --device cpu "
SD_MISTAKES = [  # (command, words its message must hold): {new} is a fresh path
    ("reconstruct " + W.replace("tiny.safetensors", "evil.ckpt") + "--image {d}/in32.png --out {new}.png", ["evil.ckpt", "refused"]),
    ("reconstruct " + W.replace("tiny.safetensors", "text.ckpt") + "--image {d}/in32.png --out {new}.png", ["text.ckpt", "not a .safetensors file"]),
    ("reconstruct " + W + "--ema --image {d}/in32.png --out {new}.png", ["holds no EMA weights"]),
    ("reconstruct " + W.replace("tiny.", "overflow.") + "--image {d}/in32.png --out {new}.png", ["decoded pixels", "NaN"]),
    ("encode " + W.replace("tiny.", "overflow.") + "--data {d}/imgs --out {new}.safetensors", ["latents", "NaN"]),
    ("encode " + W + "--data {d}/imgs --out {new}.npz", ["is not a .safetensors file"]),
    ("encode " + W + "--data {d}/imgs --resolution 31 --out {new}.safetensors", ["multiple of 2"]),
    ("encode " + W + "--data {d}/imgs --out {d}/lat.safetensors", ["exists", "--overwrite"]),
    ("encode --weights {d}/tiny.safetensors --device cpu --config {d}/c_flux2bad.json --data {d}/imgs --out {new}.safetensors",
     ["describes no model"]),
    ("decode " + W + "--latents {d}/nolat.safetensors --out {new}", ["'latents' are [0]"]),
    ("decode " + W + "--latents {d}/lat16.safetensors --out {new}", ["[1, 16, 4, 4]", "(N, 4, h, w)"]),
    ("decode " + W + "--latents {d}/lat0.safetensors --out {new}", ["[0, 4, 4, 4]"]),
    ("decode " + W + "--latents {d}/latnan.safetensors --out {new}", ["latnan.safetensors", "NaN or infinite"]),
    ("decode " + W + "--latents {d}/latscale0.safetensors --out {new}", ["metadata", "latent convention"]),
    ("decode " + W + "--latents {d}/latlist.safetensors --out {new}", ["metadata", "not the JSON encode writes"]),
    ("decode " + W + "--latents {d}/lat.safetensors --out {d}/decoded", ["000000.png exists"]),
    ("decode " + W + "--latents {d}/none.safetensors --out {new}", ["No such file", "none.safetensors"]),
    ("decode --weights {d}/tiny.safetensors --device cpu --config {d}/c_scale0.json --latents {d}/lat.safetensors --out {new}",
     ["c_scale0.json", "latent convention"]),
    ("decode --weights {d}/tiny.safetensors --device cpu --config {d}/c_mean3.json --latents {d}/lat.safetensors --out {new}",
     ["c_mean3.json", "one statistic per latent channel"]),
    ("decode --weights {d}/tiny.safetensors --device cpu --config {d}/c_meannum.json --latents {d}/lat.safetensors --out {new}",
     ["c_meannum.json", "latent convention"]),
    ("encode --weights {d}/grey --device cpu --data {d}/imgs --out {new}.safetensors", ["RGB", "1 channels"]),
    ("convert --weights {d}/tiny.safetensors --preset tiny --export {d}/tiny.safetensors", ["also an input"]),
    ("convert " + W + "--export ''", ["--export  is not a .safetensors file"]),
]


@pytest.mark.parametrize("command, words", SD_MISTAKES, ids=[f"{c.split()[0]} {i}" for i, (c, _) in enumerate(SD_MISTAKES)])
def test_every_user_mistake_is_one_line_and_exit_2_and_writes_nothing(command, words, sd_inputs, tmp_path, capsys):
    new = str(tmp_path / "new")
    before = snapshot(sd_inputs["d"])
    assert sd_main(shlex.split(command.format(**sd_inputs, new=new))) == 2
    sd_error(capsys, *[w.format(**sd_inputs) for w in words])
    assert snapshot(sd_inputs["d"]) == before and os.listdir(tmp_path) == []  # nothing for {new}, {new}.png, ...
