"""The Fréchet distance between Gaussians fitted to features (FID on Inception pool3 features).

d = ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2), the squared 2-Wasserstein distance
between N(mu1, s1) and N(mu2, s2). pytorch-fid takes scipy.linalg.sqrtm of the non-symmetric
product s1 s2: with fewer samples than feature dimensions (2048 for Inception) the covariances
are singular, sqrtm can fail or return complex values, and it then retries with an eps added to
the diagonals, which changes the answer. Here tr sqrt(s1 s2) = tr sqrt(A s2 A) with A = sqrt(s1)
(similar matrices, and A s2 A is symmetric positive semi-definite), so two symmetric
eigendecompositions give it, with eigenvalues that are zero up to rounding (negative or not)
set to 0.
"""

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64, unbiased, as pytorch-fid) of features [N, D]."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [samples, dims], got shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {features.shape[0]}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features contain NaN or infinity")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def _sqrt_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
    """Square roots of a PSD matrix's computed eigenvalues. Those within rounding of zero (below
    size * eps * the largest) are set to 0: a singular covariance's null space comes back as
    +-1e-14 and sqrt would turn each into 1e-7, a bias that adds up over thousands of them."""
    noise = np.max(np.abs(eigenvalues), initial=0.0) * eigenvalues.size * np.finfo(np.float64).eps
    return np.sqrt(np.where(eigenvalues > noise, eigenvalues, 0.0))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix."""
    eigenvalues, eigenvectors = np.linalg.eigh(s)
    return (eigenvectors * _sqrt_eigenvalues(eigenvalues)) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1 or mu2.ndim != 1:
        raise ValueError(f"means must be vectors, got shapes {mu1.shape} and {mu2.shape}")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the means differ in length: mu1 {mu1.shape}, mu2 {mu2.shape}")
    d = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} has shape {sigma.shape}, expected {(d, d)} for {d}-d means")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains NaN or infinity")
    # Covariances are symmetric up to rounding; symmetrising makes eigh's assumption exact.
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sum(_sqrt_eigenvalues(np.linalg.eigvalsh((middle + middle.T) / 2)))
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    # A squared distance: only rounding can make it negative (identical inputs give ~ -1e-13).
    return float(max(distance, 0.0))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets [N, D] and [M, D] (e.g. Inception pool3 features)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def fid(features_generated, features_reference) -> float:
    """FID; either side may be features [N, D] or precomputed statistics (mu, sigma), such as
    a reference set's saved once (pytorch-fid's .npz holds them as `mu` and `sigma`)."""

    def stats(x):
        if isinstance(x, tuple | list) and len(x) == 2:
            return x
        return feature_statistics(x)

    return frechet_distance(*stats(features_generated), *stats(features_reference))
