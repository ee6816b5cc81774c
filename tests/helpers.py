"""Independent fp64 references for the selector tests."""


def fp64_distances_knn(latents, cands):
    """Squared L2 in float64: latents [B, ...], cands [B, k, ...] -> [B, k]."""
    x = latents.double().flatten(1)[:, None, :]
    return (cands.double().flatten(2) - x).square().sum(-1)


def fp64_distances_pool(latents, pool):
    """Squared L2 in float64: latents [B, ...], pool [P, ...] -> [B, P]."""
    x = latents.double().flatten(1)
    p = pool.double().flatten(1)
    return (x[:, None, :] - p[None, :, :]).square().sum(-1)
