"""The images suite end to end (draw, FID, CLIP score) against the PyTorch references.

The weights are random (the real ones are never downloaded): pytorch-fid's Inception with every
tensor perturbed, saved as the .pth pytorch-fid ships, and a tiny transformers CLIP saved as a
Hugging Face directory. The suite's FID must equal pytorch-fid's features through scipy's formula
on the same images, and its CLIP score transformers' features of the same pixels and prompts.
"""

import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from tests.helpers import importable_torchvision
from tests.test_clip import SHAKESPEARE, learn_merges, reference_clip, write_tokenizer
from tests.test_evaluation import small_config
from tests.test_fid import perturbed_inception_state, torch_features
from transfusion_jax.data.images import to_uint8
from transfusion_jax.evaluation.clip import load_clip
from transfusion_jax.evaluation.evaluator import Evaluator
from transfusion_jax.model import Transfusion

torch = pytest.importorskip("torch", reason="the references are pytorch-fid and transformers")
pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception", reason="reference FID")


def scipy_fid(a, b):
    """pytorch-fid's formula: ||mu1 - mu2||^2 + tr(s1 + s2 - 2 sqrtm(s1 s2))."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 5 images: rank-4 covariances
def test_images_suite_equals_the_references(tmp_path, monkeypatch):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} (the CLIP vocabulary's text) is absent")
    importable_torchvision(torch)
    import torchvision

    state = perturbed_inception_state(torch, torchvision)
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    inception = pytorch_fid_inception.InceptionV3([3], use_fid_inception=True).eval()
    torch.save(state, tmp_path / "pt_inception.pth")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    write_tokenizer(tokenizer, learn_merges(SHAKESPEARE.read_text()[:20_000], 300))
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    clip = reference_clip(clip_dir, tokenizer, act="quick_gelu", legacy_eos=False)

    cfg = small_config(
        num_examples=5,
        batch_size=3,
        inception_weights=str(tmp_path / "pt_inception.pth"),
        clip_weights=str(clip_dir),
    )
    ev = Evaluator(cfg, Transfusion(cfg, nnx.Rngs(0)))
    got = ev.run(["images"])

    drawn = np.stack(ev.artifacts["images"]["drawn"])
    prompts = ev.artifacts["images"]["prompts"]
    real = np.stack([to_uint8(x.image) for x in ev.examples()])
    assert drawn.shape == real.shape == (5, 16, 16, 3) and got["images/num"] == 5
    want_fid = scipy_fid(
        torch_features(torch, inception, drawn), torch_features(torch, inception, real)
    )
    assert got["images/fid"] == pytest.approx(want_fid, rel=1e-3, abs=1e-3)

    scorer = load_clip(clip_dir)
    pixels = torch.from_numpy(scorer.preprocess(drawn).transpose(0, 3, 1, 2))
    ids = torch.from_numpy(scorer.tokenizer(prompts).astype(np.int64))
    with torch.no_grad():
        image = clip.get_image_features(pixel_values=pixels)
        text = clip.get_text_features(input_ids=ids)
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    cos = torch.nn.functional.cosine_similarity(image, text).numpy()
    assert got["images/clip_score"] == pytest.approx(np.mean(100 * np.maximum(cos, 0)), abs=1e-3)
