"""Tests run on CPU with 8 simulated devices (set before jax is imported).

`pytest -m "not slow"` is the fast subset (under a minute on 2 cores): everything that trains,
runs a command line or generates through a trained model is marked slow, here by module and by
name, so the marks sit in one place.
"""

import atexit
import fcntl
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
# Tests compile far more than they run, and most of a CPU compile is LLVM optimising code that a
# test runs a few times. JAX's switch for that case (LLVM at level 0, no expensive passes; the
# HLO passes unchanged) cuts a 2-step training run's CPU time from 71 s to 29 s. The commands the
# tests start inherit it, so in-process and subprocess runs still compare. `=0` turns it off.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# One persistent compilation cache for the session, its processes and the commands it runs
# (they inherit the environment): the many runs of the same tiny configs (a resume, a reference
# run, a second command on one checkpoint) compile each program once. A hit returns the
# executable that compiling the same program with the same flags gives, so no test sees a
# difference but time. Removed when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="transfusion-jax-test-compile-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Every program, not only those that took over a second to compile (jax's default): most of the
# suite's compiles are shorter, and the same small programs recur across tests (measured: the
# generator and evaluation tests take 108 s instead of 125 s on 2 cores).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def _backport_cheap_tracer_sharding_error():
    """jax < 0.11 builds `getattr(tracer, "sharding", None)`'s AttributeError with a search of
    the whole traced program for the value's origin, and flax asks it at every parameter a
    module creates under tracing (its RNG counter update), so building a VAE in `eval_shape`
    grows quadratically: 1.7 s each, 15% of a discrete run's test. jax 0.11 raises the same
    error without the search; this gives jax 0.10 that property. Only the message differs."""
    import jax
    from jax._src import core

    if jax.__version_info__ >= (0, 11):
        return

    def sharding(self):
        raise AttributeError(f"The 'sharding' attribute is not available on {self._error_repr()}.")

    core.Tracer.sharding = property(sharding)


_backport_cheap_tracer_sharding_error()

SLOW_MODULES = {
    "test_cli",
    "test_evaluate_cli",
    "test_images_suite",
    "test_faults",
    "test_flash_training",
    "test_generator",
    "test_multiprocess",
    "test_overfit",
    "test_readme",
    "test_sample_cli",
    "test_training",
    "test_vae_training",
}
SLOW_TESTS = {
    "test_pixel_space_latents_follow_the_image_size",
    "test_text_cached_and_tfds_sources_train_through_the_trainer",
    "test_trains_on_the_prepared_fixture",  # test_tfds_fixture
    "test_cli_refuses_an_unprepared_dataset_in_one_line",
    "test_corrupt_folder_trains_on",
    "test_train_resume_load_sample_evaluate_export_and_plot_in_a_bucket",
    "test_worker_processes_give_the_same_batches",
    "test_worker_processes_outlive_a_stop_signal_sent_to_the_process_group",
    "test_scanned_layers_equal_a_python_loop",
    "test_the_runs_true_caption_losses_are_the_diffusion_suites",  # trains tiny_shapes_run
    "test_binding_rows_are_the_subsets_losses_each_example_with_its_own_noise",  # the same
    "test_loss_is_zero_for_a_perfect_predictor",
    "test_scorer_reads_every_rendered_scene",
    # a model's evaluation, and the full-size Inception against pytorch-fid's
    "test_text_suite_equals_a_numpy_recomputation",
    "test_text_suite_scores_documents_longer_than_a_row",
    "test_diffusion_suite_equals_the_error_recomputed_from_the_prediction",
    "test_shapes_and_captions_suites_score_an_oracle",
    "test_caption_likelihood_after_own_and_other_images_equals_a_recomputation",
    "test_features_match_pytorch_fid",
    "test_float_images_in_minus_one_to_one_match_uint8",
    "test_legacy_format_file_loads_the_same_weights",
    "test_wrong_weights_name_the_key_and_file",
    # the flash kernels in Pallas interpret mode, and compiles for a virtual TPU
    "test_output_and_gradients_match_dense_attention",
    "test_matches_dense_xla_attention",
    "test_forward_and_backward_compile_through_mosaic",
    "test_key_blocks_that_no_query_sees_get_zero_gradients",
    "test_tiles_outside_the_bounds_are_never_read",
    "test_dispatch_runs_the_kernel_from_key_ranges",
    "test_dispatch_with_default_blocks",
    "test_fully_masked_blocks_are_skipped",
    "test_lowers_to_triton_for_cuda",
    # compiles of bigger models, reference-model comparisons, commands and plots
    "test_a_step_that_does_not_fit_prints_fits_0",
    "test_eval_results_add_points",
    "test_plot_runs_draws_one_panel_per_metric",
    "test_x_flops_needs_train_flops",
    "test_main_writes_the_image",
    "test_output_shapes_follow_the_downsampling_factor",
    "test_encode_and_decode_match_diffusers",
    "test_lpips_matches_a_torch_vgg16_reference",
    "test_features_and_scores_match_transformers",
    "test_features_reject_bad_images",
    "test_only_the_weights_asked_for_are_restored",
    "test_the_cli_samples_on_the_mesh_it_is_given",
    "test_params_only_restore_migrates_flat_attention_weights",
    "test_the_train_command_refuses_a_config_that_cannot_work_in_one_line",
    "test_transfusion_of_the_spec_is_transfusion_of_the_config",
    "test_paper_sizes_match_nominal",
    "test_the_same_seed_gives_the_same_weights",
    "test_a_tiny_vq_overfits_a_fixed_batch",
    "test_vq_training_logs_codebook_usage_and_load_vq_reads_the_tokenizer",
    # discrete (VQ token) runs: a trained tokenizer, a short run, the comparison runner
    "test_the_tokenizer_decides_the_codebook_and_the_window",
    "test_the_train_step_tokenizes_each_image_as_the_tokenizer_does",
    "test_a_discrete_run_trains_and_logs_its_split_losses",
    "test_caption_scores_of_a_discrete_run_read_its_image",
    "test_micro_run_writes_results_and_skips_finished_runs",
    # discrete generation with the KV cache, against uncached recomputations
    "test_cached_guided_image_tokens_equal_an_uncached_recomputation",
    "test_a_given_image_enters_as_boi_codes_eoi_and_text_never_samples_codes",
    "test_rows_not_drawing_an_image_keep_their_context",
}
# Parametrized cases kept out of the fast subset (the other cases of those tests stay in it):
# the U-Net variants of the model's invariance tests, big attention shapes, most solver cases.
SLOW_CASES = ("[unet]", "test_xla_attention_matches_jax_reference[4]", "recovers_gaussian[ddpm")


def built_once(tmp_path_factory, name: str, build) -> "os.PathLike":
    """The folder `build(folder)` fills, built once per test run: with pytest-xdist every worker
    asks, the first builds it under a lock in the run's shared temporary folder, the others
    wait and read it. Tests only read such folders (one that writes copies it first)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_shapes_run(tmp_path_factory):
    """tests.helpers.tiny_shapes_config() trained on 2 devices (fsdp): one freshly trained run
    that test_sample_cli and test_evaluate_cli read (a test that writes into a run copies it)."""
    import jax

    from tests.helpers import tiny_shapes_config
    from transfusion_jax.train import train

    def build(workdir):
        train(tiny_shapes_config(), workdir, devices=jax.devices()[:2])

    return built_once(tmp_path_factory, "tiny_shapes_run", build)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A VQ tokenizer (tests.test_vq.vq_test_config on the shapes scenes: 16 px images to 8x8
    codes of 32) trained 6 steps on one device: the one the VQ loading, discrete-run and
    comparison-runner tests read."""
    import jax

    from tests.test_vq import vq_test_config
    from transfusion_jax.train_vae import train_vae

    def build(workdir):
        cfg = vq_test_config()
        cfg.data.update(source="shapes", path="")
        train_vae(cfg, workdir, devices=jax.devices()[:1])

    return built_once(tmp_path_factory, "tiny_tokenizer", build)


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        slow_case = any(case in item.nodeid for case in SLOW_CASES)
        if module in SLOW_MODULES or item.originalname in SLOW_TESTS or slow_case:
            item.add_marker(pytest.mark.slow)
