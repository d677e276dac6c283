"""The quality metrics against independent computations and hand-made cases."""
import math

import numpy as np
import pytest
import torch

from postdiff_compile.lab.attributes import CELLS, score, targets
from postdiff_compile.metrics.quality import frechet_distance, psnr, ssim
from postdiff_compile.lab.scenes import Scene, SceneObject, make_batch
from postdiff_compile.lab.study import equal_flops_baseline, pareto_front
from postdiff_compile.lab.tune import grid, spearman


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum(s_a^2 + s_b^2 - 2 s_a s_b).
    gen = torch.Generator().manual_seed(0)
    n, d = 200_000, 4
    sa, sb = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 1.5, 3.0])
    mu = torch.tensor([0.5, 0.0, -1.0, 0.0])
    a = torch.randn(n, d, generator=gen) * sa
    b = torch.randn(n, d, generator=gen) * sb + mu
    expected = float(mu.pow(2).sum() + (sa ** 2 + sb ** 2 - 2 * sa * sb).sum())   # 1.25 + 6.0 = 7.25
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.05)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_frechet_distance_with_correlated_covariances():
    # Rotation of a diagonal Gaussian: the same spectrum, so the trace term alone vanishes only when aligned.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(100_000, 2, generator=gen) * torch.tensor([2.0, 0.5])
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    b = a @ rot.T                              # covariance diag(0.25, 4): FD = (2 - 0.5)^2 * 2 = 4.5
    assert frechet_distance(a, b) == pytest.approx(4.5, rel=0.02)
    with pytest.raises(ValueError, match=r"same d, got \(100000, 1\), \(100000, 2\)"):
        frechet_distance(a[:, :1], b)


def test_psnr_of_a_known_error():
    ref = torch.rand(2, 3, 8, 8) * 0.8
    assert torch.allclose(psnr(ref + 0.1, ref), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.isinf(psnr(ref, ref)).all()


def _ssim_by_loops(x: np.ndarray, y: np.ndarray, size=11, sigma=1.5) -> float:
    """SSIM written out window by window (Wang et al. 2004), one channel."""
    ax = np.arange(size) - (size - 1) / 2
    g = np.exp(-ax ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_a_window_by_window_reference():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 16, 18, generator=gen)
    y = (x + 0.2 * torch.rand(1, 2, 16, 18, generator=gen)).clamp(0, 1)
    expected = np.mean([_ssim_by_loops(x[0, c].numpy().astype(np.float64), y[0, c].numpy().astype(np.float64))
                        for c in range(2)])
    assert float(ssim(x, y)[0]) == pytest.approx(expected, abs=1e-9)
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim(x, y)[0]) < 0.99


def _scene(*objects, pattern="plain", background="grey"):
    return Scene(tuple(SceneObject(*o) for o in objects), pattern, background)


def test_targets_and_scores_by_hand():
    scene = _scene(("circle", "red", "small", "top left"), ("cross", "white", "large", "center"), pattern="striped")
    t = targets([scene])[0]
    assert t.shape == (3 * CELLS + 2,)
    assert list(t[0:3]) == [1, 1, 1]            # red (1st colour), circle (1st shape), small (1st size)
    assert list(t[12:15]) == [6, 4, 2]          # center = cell 4: white, cross, large
    assert t[3:12].sum() == 0 and t[15:27].sum() == 0
    assert list(t[-2:]) == [0, 1]               # grey, striped
    wanted = np.stack([t, t])
    perfect = score(wanted, wanted)
    assert perfect.caption_match == 1.0 and perfect.attribute_accuracy == 1.0
    wrong = wanted.copy()
    wrong[0, 1] = 2                             # image 0: a square instead of a circle
    wrong[1, 3] = 3                             # image 1: an extra object in an empty cell
    s = score(wrong, wanted)
    statements = 3 * 2 + 7 + 2                  # per image: 2 objects, 7 empty cells, background
    assert s.caption_match == 0.0
    assert s.attribute_accuracy == pytest.approx((2 * statements - 2) / (2 * statements))
    assert list(s.per_image_match) == [False, False]
    assert s.breakdown == {"colour": 1.0, "shape": 0.75, "size": 1.0, "empty": 13 / 14, "background": 1.0,
                           "pattern": 1.0}


def test_shipped_classifier_reads_real_scenes():
    from postdiff_compile.lab.classifier import TEST_SEED_BASE, load_classifier

    classifier = load_classifier()
    images, _, scenes = make_batch(TEST_SEED_BASE + 5, 400)
    s = score(classifier.predict(torch.from_numpy(images)), targets(scenes))
    print(f"real images: caption match {s.caption_match:.3f}, attribute accuracy {s.attribute_accuracy:.4f}")
    assert s.attribute_accuracy > 0.98 and s.caption_match > 0.85
    # Noise makes it worse, not better: the score can fail.
    noisy = torch.from_numpy(images) + 0.8 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    assert score(classifier.predict(noisy), targets(scenes)).caption_match < s.caption_match - 0.2


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties get average ranks: ranks [1.5, 1.5, 3] vs [1, 2, 3] -> Pearson of those ranks.
    assert spearman([5, 5, 9], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_tuning_grid_is_valid_and_distinct():
    configs = grid(20)
    assert len(configs) == len(set(configs)) == 45
    assert any(c.is_identity for c in configs)
    assert all(c.cross_attn_cache_step in (0, 5, 10) for c in configs)


def test_equal_flops_interpolation_and_pareto_front():
    rows = [{"name": "b", "kind": "baseline", "scheduler": "ddim", "flops_fraction": 1.0, "frechet": 1.0},
            {"name": "d10", "kind": "fewer steps", "scheduler": "ddim", "flops_fraction": 0.5, "frechet": 3.0},
            {"name": "p10", "kind": "fewer steps", "scheduler": "dpmsolver++", "flops_fraction": 0.5, "frechet": 2.0},
            {"name": "p20", "kind": "fewer steps", "scheduler": "dpmsolver++", "flops_fraction": 1.0, "frechet": 1.5},
            {"name": "x", "kind": "postdiff", "scheduler": "ddim", "flops_fraction": 0.75, "frechet": 1.2}]
    # At 0.75: ddim interpolates 2.0, dpm++ 1.75; the better is 1.75.
    assert equal_flops_baseline(rows, 0.75) == pytest.approx(1.75)
    assert equal_flops_baseline(rows, 0.25) is None
    assert [r["name"] for r in pareto_front(rows)] == ["p10", "x", "b"]


def test_classifier_per_image_size_reads_its_size_from_the_file(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from postdiff_compile.lab.classifier import FEATURES, AttributeClassifier, load_classifier

    wide = AttributeClassifier(64).eval()
    assert wide.features(torch.zeros(2, 3, 64, 64)).shape == (2, FEATURES)
    with pytest.raises(ValueError, match="reads 64x64 images, got \\(32, 32\\)"):
        wide.features(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not 48"):
        AttributeClassifier(48)
    path = tmp_path / "c.safetensors"
    save_file(wide.state_dict(), str(path), metadata={"train": json.dumps({"size": 64})})
    loaded = load_classifier(path)
    assert loaded.size == 64
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(loaded.features(x), wide.features(x))
    assert load_classifier().size == 32          # the shipped 32 px classifier, unchanged
