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


def fake_adapter(points=(), script: str | None = None, **fields):
    """An :class:`~immiscible_host.adapter.Adapter` over a made-up host (a guard point is added when
    the table has none), running ``script``."""
    from immiscible_host.adapter import Adapter, Host
    from immiscible_host.points import GUARD, INLINE, OPTIONS, PatchPoint

    points = tuple(points)
    if not any(p.kind == GUARD for p in points):
        points += (PatchPoint("fake.Step.backward", "fakelib", "Step.backward", GUARD, patched_with="fakepkg.util",
                              in_host=False),)
    identified = {p.module for p in points if p.identifies}
    for module in dict.fromkeys(p.trigger for p in points if p.kind != INLINE):
        if module not in identified:
            points += (PatchPoint(f"{module}.add_args", module, "add_args", OPTIONS, params=("parser",),
                                  identifies=True),)
    host = Host(**{"name": "fakehost", "package": "fake_patch", "short": "fake", "points": points, "k_help": "k",
                   "install_flag": "--fakehost", "disable_env": "FAKE_DISABLE", "dump_env": "FAKE_DUMP",
                   "checkout_file": "fakepkg/util.py", "root_module": ("fakepkg.util", 2),
                   "trainer_globs": ("*train*.py",), "version_files": ("fakepkg", ("*.py",)), **fields})
    adapter = Adapter(host)
    adapter.script = script
    return adapter
