"""Parameter counts of the paper's sizes (no allocation) and config validation."""

import pytest

from tests.helpers import ROOT, tiny_config
from transfusion_jax.config import llama_ffn_dim, load_config, resolve_model
from transfusion_jax.model import parameter_counts

PAPER = str(ROOT / "configs" / "paper.py")
NOMINAL = {"0.16b": 0.16e9, "0.37b": 0.37e9, "0.76b": 0.76e9, "1.4b": 1.4e9, "7b": 7e9}


def test_llama_ffn_rule():
    assert [llama_ffn_dim(d) for d in (768, 1024, 1536, 2048, 4096)] == [
        2048,
        2816,
        4096,
        5632,
        11008,
    ]


@pytest.mark.parametrize("size", list(NOMINAL))
def test_paper_sizes_match_nominal(size):
    linear = parameter_counts(load_config(f"{PAPER}:{size}"))
    unet = parameter_counts(load_config(f"{PAPER}:{size},unet"))
    nominal = linear["transformer"] + linear["embeddings"]  # the paper counts no patch layers
    assert abs(nominal / NOMINAL[size] - 1) < 0.05, nominal
    assert linear["patch"] < 1e6
    assert abs(unet["patch"] / 0.27e9 - 1) < 0.05, unet["patch"]  # the paper's ~0.27B U-Net
    assert unet["transformer"] == linear["transformer"]
    assert unet["total"] == sum(v for k, v in unet.items() if k != "total")


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="image.patch_size"):
        resolve_model(tiny_config(image__patch_size=3))
    with pytest.raises(ValueError, match="model.num_kv_heads"):
        resolve_model(tiny_config(model__num_kv_heads=3))
    with pytest.raises(ValueError, match="patch.kind"):
        resolve_model(tiny_config(patch__kind="mlp"))
    with pytest.raises(ValueError, match="size '3b'"):
        load_config(f"{PAPER}:3b")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        load_config("configs/nope.py")


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(data__caption_first_prob=1.5), "data.caption_first_prob"),
        (dict(diffusion__cond_drop_rate=-0.1), "diffusion.cond_drop_rate"),
        (dict(diffusion__timestep_sampling="lognormal"), "diffusion.timestep_sampling"),
        (dict(data__text_ratio=-1.0), "data.text_ratio"),
        (dict(data__max_caption_tokens=0), "data.max_caption_tokens"),
        (dict(data__seq_len=64), "data.seq_len"),  # 64 patches + markers + a caption > 64
        (dict(train__log_every=0), "train.log_every"),
        (dict(train__checkpoint_every=0), "train.checkpoint_every"),
        (dict(optimizer__min_lr=1.0), "optimizer.min_lr"),
        (dict(optimizer__b2=1.0), "optimizer.b2"),
        (dict(patch__kind="unet"), "patch.unet_head_dim"),  # 45 channels in 2 heads of 20
    ],
)
def test_configs_that_cannot_work_fail_at_start(override, field):
    cfg = tiny_config(**override)
    if field == "data.seq_len":
        cfg.image.update(latent_size=16, patch_size=2)  # 64 patches
    if field == "patch.unet_head_dim":
        cfg.image.update(latent_size=8, patch_size=2)
        cfg.patch.update(unet_channels=(45, 60), unet_head_dim=20, unet_attention_resolution=8)
    with pytest.raises(ValueError, match=f"^config field {field}: "):
        resolve_model(cfg)


def test_the_train_command_refuses_a_config_that_cannot_work_in_one_line(tmp_path):
    """Exit status 2, one `error:` line naming the field, and no work directory left behind."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "transfusion_jax.train", "--config", "tiny"]
    cmd += ["--workdir", str(tmp_path / "run"), "--config.data.caption_first_prob=1.5"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: config field data.caption_first_prob: 1.5 must be in")
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


def test_pixel_space_latents_follow_the_image_size(tmp_path):
    import jax

    from transfusion_jax.train import train

    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    cfg.data.image_size = 28  # alone: the latent follows (28 x 28 x 3, 7 x 7 patches of 4)
    resolved = resolve_model(cfg)
    assert (resolved.image.latent_size, resolved.image.latent_channels) == (28, 3)
    cfg.model.update(d_model=64, depth=1)
    cfg.train.update(num_steps=2, log_every=1, checkpoint_every=2, eval_every=0)
    cfg.mesh.fsdp = 1
    record = train(cfg, tmp_path, devices=jax.devices()[:1])
    assert record["step"] == 2 and record["diffusion_loss"] > 0
    vae = tiny_config(image__latent_size=0)
    vae.data.latents = "vae"
    with pytest.raises(ValueError, match="image.vae_path: data.latents='vae' needs the VAE"):
        resolve_model(vae)  # latent sizes follow the VAE, so one must be named


def test_configs_are_found_by_name_and_typos_are_not_replaced(tmp_path, monkeypatch):
    from transfusion_jax.config import config_path, expand_config_flag

    monkeypatch.chdir(tmp_path)  # outside the repository
    assert config_path("tiny").read_text() == (ROOT / "configs" / "tiny.py").read_text()
    assert config_path("configs/paper.py").name == "paper.py"
    assert load_config("paper:7b").model.d_model == 4096
    with pytest.raises(FileNotFoundError, match="not a shipped config"):
        config_path("elsewhere/configs/tiny.py")  # a typo in a custom path must not train tiny
    argv = expand_config_flag(["prog", "--config", "tiny", "--config=paper:0.76b,unet", "--x"])
    assert argv[2].endswith("tiny.py") and argv[3].endswith("paper.py:0.76b,unet")
    assert argv[-1] == "--x"


def test_every_config_key_says_what_it_means():
    from transfusion_jax.config import base_config, describe, key_meanings

    meanings = key_meanings()
    keys = {f"{s}.{k}" for s, values in base_config().items() for k in values}
    assert keys == set(meanings)
    assert [k for k in keys if len(meanings[k]) < 8] == []
    assert "optimizer.b2 = 0.95  # Adam beta2." in describe(base_config()).splitlines()


def test_every_vae_config_key_says_what_it_means():
    from transfusion_jax.config import describe, key_meanings
    from transfusion_jax.vae.config import vae_base_config

    meanings = key_meanings(vae=True)
    cfg = vae_base_config()
    keys = {f"{s}.{k}" for s, values in cfg.items() for k in values}
    assert keys <= set(meanings)
    assert [k for k in keys if len(meanings[k]) < 8] == []
    lines = describe(cfg).splitlines()
    assert "train.batch_size = 32  # Global, in images." in lines
    latent = "vae.latent_channels = 4  # Channels of the latent"
    assert any(line.startswith(latent) for line in lines)


def test_the_configs_command_lists_keys_and_refuses_unknown_names_in_one_line(capsys):
    import importlib

    command = importlib.import_module("transfusion_jax.configs.__main__")
    command.main(["tiny"])
    assert "train.num_steps = 1500  # " in capsys.readouterr().out
    for name, message in [("nope", "--config nope: no such file"), ("paper:9b", "size '9b'")]:
        with pytest.raises(SystemExit) as exit_info:
            command.main([name])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and message in err
