"""Train the KL autoencoder whose latents Transfusion models (the paper trained its own: 8 latent
channels, downsampling 8, 86M parameters), or with `vae.kind=vq` the VQ tokenizer whose code ids
the Chameleon baseline models (configs/vq_tiny.py, configs/vq_paper.py).

  python -m transfusion_jax.train_vae --config vae_tiny --workdir workdirs/vae \
      --config.data.path=../shared/data/noto_emoji_72

The loop is Transfusion's (`train.train` with `VAETask`): the same config overrides, mesh, Orbax
checkpoints with exact resume, preemption handling, non-finite guard and DIR/metrics.jsonl. Every
`train.eval_every` steps (and at the end) the record carries `val_psnr`, `val_ssim` and `val_l1`
of posterior-mean (VQ: nearest-code) reconstructions of held-out images (a fixed ~5% of the files,
chosen by a hash of the file name), and for a VQ the share of the codebook those images use
(`val_codebook_usage`). Every KL checkpoint stores the per-channel mean and std of the latents of
`train.stats_images` training images, which `load_vae(DIR)` turns into the latent normalisation.
"""

import jax
import numpy as np
from absl import flags

from transfusion_jax import cli
from transfusion_jax import train as trainer
from transfusion_jax.vae.config import vae_base_config
from transfusion_jax.vae.data import ImageBatches, first_images
from transfusion_jax.vae.perceptual import load_lpips
from transfusion_jax.vae.train_step import VAETrainProgram, batched


class VAETask:
    """What the training loop needs to know about the VAE (see train.TransfusionTask)."""

    unit = "images"
    default_config = staticmethod(vae_base_config)

    @staticmethod
    def resolve(cfg):
        """The checked config; the perceptual network's file is opened before anything starts."""
        cfg = VAETrainProgram.resolve(cfg)
        if cfg.loss.perceptual_weight > 0:
            load_lpips(cfg.loss.perceptual_path)
        return cfg

    def __init__(self, cfg, mesh):
        self.cfg, self.mesh = cfg, mesh
        self.program = VAETrainProgram(cfg, mesh)
        self.units_per_step = cfg.train.batch_size
        self.flops_per_unit = 0.0  # convolutions: no MFU
        self.vq = cfg.vae.kind == "vq"
        regulariser = ("commitment", "codebook_usage", "codebook_perplexity", "codes_restarted")
        self.logged = ("loss", "l1", "l2", "psnr", "learning_rate", "grad_norm")
        self.logged += regulariser if self.vq else ("kl",)
        if cfg.loss.perceptual_weight > 0:
            self.logged += ("perceptual",)
        if cfg.loss.disc_weight > 0:
            self.logged += ("g_loss", "d_loss")
        training = cfg.train
        self.eval_images = first_images(cfg, training.eval_images, held=True)
        self.stats_images = first_images(cfg, training.stats_images, held=False)
        if training.eval_images and not len(self.eval_images):
            trainer.log("warning: the held-out split is empty; no val_* metrics")
        self._compiled = {}  # name -> the compiled function, made on first use

    def describe(self) -> str:
        params = self.program.abstract_state().params
        sizes = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}
        held = f"{len(self.eval_images)} held-out images for evaluation"
        return (
            "parameters: "
            + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in sizes.items())
            + (f"; {held}")
        )

    def make_source(self, local_batch: int, process_index: int, process_count: int):
        return ImageBatches(self.cfg, local_batch, process_index, process_count)

    def _run(self, which: str, params, images: np.ndarray):
        """`program.compile_<which>` (scores or latents) over `images`, in training batches."""
        batch = self.cfg.train.batch_size
        if which not in self._compiled:
            compile_fn = getattr(self.program, f"compile_{which}")
            self._compiled[which] = compile_fn((batch, *images.shape[1:]))
        return batched(self._compiled[which], params, images, batch, self.mesh)

    def evaluate(self, state, step: int) -> dict:
        del step
        if not len(self.eval_images):
            return {}
        scores = self._run("scores", state.params, self.eval_images)
        codes = scores.pop("codes", None)
        metrics = {f"val_{k}": float(np.mean(v)) for k, v in scores.items()}
        if codes is not None:  # the share of the codebook the held-out images use
            used = len(np.unique(codes))
            metrics["val_codebook_usage"] = used / self.cfg.vae.codebook_size
        return metrics

    def checkpoint_info(self, state) -> dict | None:
        """The latent statistics of this step's weights (load_vae normalises with them); a VQ
        autoencoder's tokens are ids, with nothing to normalise."""
        if self.vq or not len(self.stats_images):
            return None
        z = self._run("latents", state.params, self.stats_images)
        flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
        return {
            "latent_mean": flat.mean(axis=0).tolist(),
            "latent_std": flat.std(axis=0).tolist(),
            "latent_images": len(self.stats_images),
        }

    def progress_line(self, r: dict) -> str:
        if self.vq:
            regulariser = (
                f"commitment {r['commitment']:.3g}, codes used {r['codebook_usage']:.1%}, "
                f"restarted {r['codes_restarted']:.0f}"
            )
        else:
            regulariser = f"kl {r['kl']:.3g}"
        line = f"loss {r['loss']:.4f} (l1 {r['l1']:.4f}, {regulariser}) psnr {r['psnr']:.2f}"
        if "val_psnr" in r:
            line += f"  val psnr {r['val_psnr']:.2f} ssim {r['val_ssim']:.3f}"
        if "val_codebook_usage" in r:
            line += f" codes used {r['val_codebook_usage']:.1%}"
        return line


def train_vae(cfg, workdir, devices=None, stop_at_step=None, allow_config_change=False) -> dict:
    """Runs (or resumes) VAE training; returns the last logged metrics."""
    return trainer.train(cfg, workdir, devices, stop_at_step, allow_config_change, task=VAETask)


def main():
    trainer.initialize_processes()
    f = flags.FLAGS
    train_vae(f.config, f.workdir, allow_config_change=f.allow_config_change)


def define_flags() -> None:
    """The training command's flags, listed by this command's --help (absl lists only the
    flags of the module that runs)."""
    trainer.define_flags()
    flags.adopt_module_key_flags(trainer)


if __name__ == "__main__":
    cli.run(main, define_flags)
