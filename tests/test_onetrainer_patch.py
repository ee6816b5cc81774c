"""The OneTrainer adapter on a small fake of OneTrainer's ``modules`` package (the same module and
function names, the same config casting, the same per-step generator), imported through the real
adapter's hook. The real OneTrainer is tests/integration/test_onetrainer.py.
"""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import immiscible
from immiscible_host.generator_draw import SelectFirstGeneratorDraw
from immiscible_host.points import KINDS, inspect_sources
from immiscible_host.ranks import seed_from_draw
from immiscible_host.runtime import SelectionNotApplied
from immiscible_host.telemetry import REDUCTION_KEY, STOCK_KEY
from immiscible_host.typed_config import CHOICES, raw_value
from immiscible_host.wrappers import FACTORIES, RecordingComponents, add_fields
from onetrainer_patch.host import ADAPTER, CONFIG_KEYS, HOST, UI_FIELDS

# --------------------------------------------------------------------------- the fake OneTrainer
# Each file is what the adapter's table names, cut down to what the adapter touches; the bodies
# copy OneTrainer 23df3832's behaviour (from_dict's casts, _create_noise's draws, predict's seeding).
FAKE = {
    "modules/__init__.py": "",
    "modules/util/__init__.py": "",
    "modules/util/config/__init__.py": "",
    "modules/util/config/BaseConfig.py": '''
        class BaseConfig:
            def __init__(self, data):
                self.types, self.nullables, self.default_values = {}, {}, {}
                for name, value, var_type, nullable in data:
                    setattr(self, name, value)
                    self.types[name], self.nullables[name], self.default_values[name] = var_type, nullable, value

            def to_dict(self):
                return {name: getattr(self, name) for name in self.types}

            def from_dict(self, data, migrate=True):
                for name in self.types:
                    try:
                        if self.types[name] is int:
                            setattr(self, name, int(data[name]))
                        elif self.types[name] is float:
                            setattr(self, name, float(data[name]))
                        elif self.types[name] is str:
                            setattr(self, name, str(data[name]))
                        else:
                            setattr(self, name, data[name])
                    except Exception:
                        if name in data:
                            print(f"Could not set {name} as {data[name]}")
                return self
        ''',
    "modules/util/config/TrainConfig.py": '''
        from modules.util.config.BaseConfig import BaseConfig

        class TrainConfig(BaseConfig):
            @staticmethod
            def default_values():
                return TrainConfig([("train_device", "cpu", str, False), ("offset_noise_weight", 0.0, float, False),
                                    ("perturbation_noise_weight", 0.0, float, False), ("batch_size", 1, int, False)])
        ''',
    "modules/util/multi_gpu_util.py": '''
        def reduce_tensor_mean(tensor):
            return tensor
        ''',
    "modules/modelSetup/__init__.py": "",
    "modules/modelSetup/mixin/__init__.py": "",
    "modules/modelSetup/mixin/ModelSetupNoiseMixin.py": '''
        import torch

        class ModelSetupNoiseMixin:
            def _create_noise(self, source_tensor, config, generator, timestep=None, betas=None):
                noise = torch.randn(source_tensor.shape, generator=generator, device=config.train_device,
                                    dtype=source_tensor.dtype)
                if config.offset_noise_weight > 0:
                    offset = torch.randn((source_tensor.shape[0], source_tensor.shape[1],
                                          *[1 for _ in range(source_tensor.ndim - 2)]),
                                         generator=generator, device=config.train_device, dtype=source_tensor.dtype)
                    noise = noise + config.offset_noise_weight * offset
                if config.perturbation_noise_weight > 0:
                    pert = torch.randn(source_tensor.shape, generator=generator, device=config.train_device,
                                       dtype=source_tensor.dtype)
                    noise = noise + config.perturbation_noise_weight * pert
                return noise

        class FakeSetup(ModelSetupNoiseMixin):
            """predict() as every OneTrainer setup seeds it: global_step, or 0 when deterministic."""
            def predict(self, model, batch, config, train_progress, *, deterministic=False):
                generator = torch.Generator(device=config.train_device)
                generator.manual_seed(0 if deterministic else train_progress)
                timestep = torch.randint(0, 1000, (batch.shape[0],), generator=generator)
                noise = self._create_noise(batch, config, generator, timestep)
                after = torch.rand(3, generator=generator)     # a later draw on the same generator
                return {"noise": noise, "timestep": timestep, "after": after}
        ''',
    "modules/modelSaver/__init__.py": "",
    "modules/modelSaver/mixin/__init__.py": "",
    "modules/modelSaver/mixin/DtypeModelSaverMixin.py": '''
        class DtypeModelSaverMixin:
            def _create_safetensors_header(self, model, state_dict=None):
                return {"modelspec.title": "fake"}
        ''',
    "modules/trainer/__init__.py": "",
    "modules/trainer/GenericTrainer.py": '''
        import modules.util.multi_gpu_util as multi
        from modules.util.config.TrainConfig import TrainConfig

        class GenericTrainer:
            def __init__(self, config, callbacks=None, commands=None):
                self.config = config

            def step(self, loss):
                multi.reduce_tensor_mean(loss)    # after backward, before the optimizer step
        ''',
    "modules/ui/__init__.py": "",
    "modules/ui/BaseTrainingTabView.py": '''
        class BaseTrainingTabView:
            def __init__(self, components):
                self.components = components

            def build(self, master, ui_state):
                self.__create_noise_frame(master, 2, ui_state)

            def __create_noise_frame(self, master, row, ui_state, supports_generalized_offset_noise=False):
                frame = self.components.section_frame(master, row)
                self.components.label(frame, 0, 0, "Offset Noise Weight", tooltip="t")
                self.components.entry(frame, 0, 1, ui_state, "offset_noise_weight")
                self.components.label(frame, 7, 0, "Noising Bias", tooltip="t")
                self.components.entry(frame, 7, 1, ui_state, "noising_bias")
        ''',
}


@pytest.fixture
def ot(tmp_path, monkeypatch):
    """The fake imported through ADAPTER's hook; afterwards hook, runtime and sys.modules as they were."""
    for rel, src in FAKE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    saved = {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] == "modules"}
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(HOST.disable_env, raising=False)
    ADAPTER.runtime.reset()
    ADAPTER.runtime.points.clear()
    ADAPTER.hook.install()
    try:
        import modules.modelSetup.mixin.ModelSetupNoiseMixin as mixin
        import modules.modelSaver.mixin.DtypeModelSaverMixin as saver
        import modules.trainer.GenericTrainer as trainer
        import modules.ui.BaseTrainingTabView as ui
        import modules.util.config.TrainConfig as tc

        yield type("OT", (), {"mixin": mixin, "trainer": trainer, "tc": tc, "saver": saver, "ui": ui,
                              "root": tmp_path})
    finally:
        ADAPTER.hook.uninstall()
        ADAPTER.runtime.reset()
        ADAPTER.runtime.points.clear()
        for m in [m for m in sys.modules if m.split(".")[0] == "modules"]:
            del sys.modules[m]
        sys.modules.update(saved)


def _config(ot, **values):
    config = ot.tc.TrainConfig.default_values()
    config.from_dict(values)
    return config


def _start(ot, **values):
    config = _config(ot, **values)
    return ot.trainer.GenericTrainer(config), config


LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))


def _predict(ot, config, step=3, latents=LATENTS, deterministic=False):
    return ot.mixin.FakeSetup().predict(None, latents, config, step, deterministic=deterministic)


# --------------------------------------------------------------------------- the table


def test_every_point_is_patched_and_reads_ok_in_the_fake(ot):
    import importlib.util

    for point in HOST.points:
        if not point.in_host and importlib.util.find_spec("tensorboard") is None:
            continue    # torch.utils.tensorboard needs the tensorboard package (OneTrainer's venv has it)
        assert ADAPTER.runtime.points[point.name].ok, (point.name, ADAPTER.runtime.points.get(point.name))
    static = dict((p.name, s) for p, s in inspect_sources(ot.root, HOST.points))
    assert all(s.ok for s in static.values()), static
    assert {p.kind for p in HOST.points} <= set(KINDS) and all(p.kind in FACTORIES for p in HOST.points)


def test_the_gui_offers_the_cores_choices():
    assert [f[0] for f in UI_FIELDS] == list(CONFIG_KEYS)
    assert CHOICES["immiscible_mode"] == immiscible.MODES and CHOICES["immiscible_metric"] == immiscible.METRICS


# --------------------------------------------------------------------------- config


def test_the_options_are_config_fields_that_save_load_and_take_config_values(ot):
    config = ot.tc.TrainConfig.default_values()
    assert {k: getattr(config, k) for k in CONFIG_KEYS} == {"immiscible_k": 1, "immiscible_mode": "knn",
                                                            "immiscible_metric": "l2", "immiscible_coarse": 0}
    config.from_dict({"immiscible_k": 8, "immiscible_metric": "cosine"})
    saved = json.loads(json.dumps(config.to_dict()))
    again = ot.tc.TrainConfig.default_values().from_dict(saved)
    assert again.immiscible_k == 8 and again.immiscible_metric == "cosine"
    again.from_dict({"immiscible_k": "16"})          # --config-value immiscible_k=16 passes a string
    assert again.immiscible_k == 16


@pytest.mark.parametrize("values,needle", [
    ({"immiscible_k": 64.5}, ("immiscible_k must be an integer in [1, ", "64.5")),
    ({"immiscible_k": "abc"}, ("immiscible_k", "'abc'")),
    ({"immiscible_k": 0}, ("immiscible_k must be in [1, ", "got 0")),
    ({"immiscible_mode": "KNN"}, ("immiscible_mode", "knn")),
    ({"immiscible_coarse": -1}, ("immiscible_coarse must be in [0, ",)),
])
def test_bad_raw_values_stop_at_start_up_naming_the_key_and_range(ot, values, needle):
    config = _config(ot, **values)
    key = next(iter(values))
    assert getattr(config, key) == ot.tc.TrainConfig.default_values().default_values[key]   # never cast
    with pytest.raises(ValueError) as info:
        ot.trainer.GenericTrainer(config)
    assert all(n in str(info.value) for n in needle), str(info.value)


def test_a_later_good_value_clears_the_error(ot):
    config = _config(ot, immiscible_k=64.5)
    config.from_dict({"immiscible_k": 8})
    ot.trainer.GenericTrainer(config)
    assert ADAPTER.runtime.settings.k == 8


def test_pr_1260s_k_noise_sampling_on_with_immiscible_k_is_an_error(ot):
    config = _config(ot, immiscible_k=8)
    config.k_noise_sampling = 64
    with pytest.raises(ValueError, match=r"immiscible_k 8 and k_noise_sampling 64"):
        ot.trainer.GenericTrainer(config)
    config.k_noise_sampling = 1
    ot.trainer.GenericTrainer(config)


def test_raw_value_accepts_what_onetrainer_writes():
    assert raw_value("immiscible_k", 8) == 8 and raw_value("immiscible_k", " 8 ") == 8
    assert raw_value("immiscible_metric", "cosine") == "cosine"
    with pytest.raises(TypeError):
        raw_value("immiscible_k", True)


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("values", [{}, {"immiscible_k": 1}], ids=["absent", "k=1"])
def test_off_is_bit_identical_to_stock(ot, values):
    _, config = _start(ot, offset_noise_weight=0.1, perturbation_noise_weight=0.1, **values)
    out = _predict(ot, config)
    ADAPTER.hook.uninstall()
    stock = ot.mixin.ModelSetupNoiseMixin._create_noise.__wrapped__
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (2,), generator=g)
    assert torch.equal(out["timestep"], t)
    assert torch.equal(out["noise"], stock(None, LATENTS, config, g, t))
    assert torch.equal(out["after"], torch.rand(3, generator=g))
    assert ADAPTER.runtime.calls == 0


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 3, 8, 8)], ids=["4-D", "5-D video"])
def test_k8_replaces_only_the_base_draw_seeded_from_it(ot, shape):
    _, config = _start(ot, immiscible_k=8, offset_noise_weight=0.1, perturbation_noise_weight=0.05)
    latents = torch.randn(*shape, generator=torch.Generator().manual_seed(9))
    out = _predict(ot, config, latents=latents)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    base = torch.randn(shape, generator=g)
    offset = torch.randn((shape[0], shape[1], *[1] * (len(shape) - 2)), generator=g)
    pert = torch.randn(shape, generator=g)
    chosen = immiscible.select_noise(latents, 8, seed=seed_from_draw(base))
    assert torch.equal(out["timestep"], t)
    assert torch.allclose(out["noise"], chosen + 0.1 * offset + 0.05 * pert)
    assert torch.equal(out["after"], torch.rand(3, generator=g))   # the generator ends where stock leaves it
    assert ADAPTER.runtime.calls == 1


def test_deterministic_validation_keeps_stock_noise(ot):
    _, config = _start(ot, immiscible_k=8)
    out = _predict(ot, config, deterministic=True)
    assert torch.equal(out["noise"], torch.randn(LATENTS.shape, generator=_seeded_after_timestep(0, 2)))
    assert ADAPTER.runtime.calls == 0 and ADAPTER.runtime.stock_batches == 0


def _seeded_after_timestep(seed, batch):
    g = torch.Generator().manual_seed(seed)
    torch.randint(0, 1000, (batch,), generator=g)
    return g


def test_the_prior_branch_gets_the_same_noise_and_counts_one_selection(ot):
    _, config = _start(ot, immiscible_k=8)
    with torch.no_grad():
        prior = _predict(ot, config, step=4)
    train = _predict(ot, config, step=4)
    assert torch.equal(prior["noise"], train["noise"])
    assert ADAPTER.runtime.calls == 1
    _predict(ot, config, step=5)
    assert ADAPTER.runtime.calls == 2


def test_a_drifted_base_draw_stops_before_the_first_optimizer_step(ot):
    trainer, config = _start(ot, immiscible_k=8)
    mixin = ot.mixin.ModelSetupNoiseMixin
    body = mixin._create_noise.__wrapped__

    def drifted(self, source_tensor, config, generator, timestep=None, betas=None):
        return torch.randn_like(source_tensor)    # no longer the step generator's draw

    mixin._create_noise.__wrapped__ = drifted
    wrapper = FACTORIES[HOST.points[3].kind](drifted, HOST.points[3], ADAPTER)
    mixin._create_noise = wrapper
    try:
        _predict(ot, config)
        with pytest.raises(SelectionNotApplied) as info:
            trainer.step(torch.zeros(()))
    finally:
        mixin._create_noise = body
    msg = str(info.value)
    assert "before the first optimizer step" in msg and "install.py --check --onetrainer" in msg
    assert ADAPTER.runtime.stock_batches == 1


def test_a_selected_first_step_trains_on(ot):
    trainer, config = _start(ot, immiscible_k=8)
    _predict(ot, config)
    trainer.step(torch.zeros(()))
    trainer.step(torch.zeros(()))


def test_the_first_draw_of_another_shape_is_not_the_base_draw():
    class Rt:
        calls = 0

        def select(self, *a, **k):
            self.calls += 1

    g, rt = torch.Generator().manual_seed(0), Rt()
    with SelectFirstGeneratorDraw(LATENTS, g, "p", rt) as slot:
        torch.randn((2, 4, 1, 1), generator=g)
        torch.randn(LATENTS.shape, generator=g)
    assert slot.seen and not slot.fired and rt.calls == 0
    assert torch.randn is not None and not hasattr(torch.randn, "__immiscible_next__")


# --------------------------------------------------------------------------- what it shows


def test_the_saved_header_carries_the_settings(ot):
    _start(ot, immiscible_k=8, immiscible_metric="cosine")
    header = ot.saver.DtypeModelSaverMixin()._create_safetensors_header(None)
    assert header["ss_immiscible_k"] == "8" and header["ss_immiscible_metric"] == "cosine"
    assert header["modelspec.title"] == "fake" and header["ss_immiscible_stock_batches"] == "0"
    _start(ot)
    assert ot.saver.DtypeModelSaverMixin()._create_safetensors_header(None) == {"modelspec.title": "fake"}


def test_tensorboard_gets_the_reduction_beside_the_loss(ot):
    point = next(p for p in HOST.points if p.name.startswith("tensorboard"))

    class Writer:
        def __init__(self):
            self.logged = []

        def add_scalar(self, tag, scalar_value, global_step=None, walltime=None):
            self.logged.append((tag, scalar_value, global_step))

    Writer.add_scalar = FACTORIES[point.kind](Writer.add_scalar, point, ADAPTER)
    _, config = _start(ot, immiscible_k=8)
    _predict(ot, config)
    w = Writer()
    w.add_scalar("lr", 0.1, 1)
    w.add_scalar("loss/train_step", 0.5, 1)
    tags = [t for t, _, _ in w.logged]
    assert tags[:2] == ["lr", "loss/train_step"] and sorted(tags[2:]) == sorted([REDUCTION_KEY, STOCK_KEY])
    logged = {t: (v, step) for t, v, step in w.logged}
    assert 0 < logged[REDUCTION_KEY][0] < 1 and logged[REDUCTION_KEY][1] == 1 and logged[STOCK_KEY] == (0, 1)


def test_the_start_up_line_reaches_the_console(ot, capsys):
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    log = logging.getLogger("immiscible_host")
    try:
        _start(ot, immiscible_k=8)
    finally:
        root.handlers[:] = saved
        for h in log.handlers[:]:
            log.removeHandler(h)
        log.propagate = True
        log.setLevel(logging.NOTSET)
    assert "immiscible: k=8 mode=knn metric=l2" in capsys.readouterr().err


# --------------------------------------------------------------------------- GUI


class FakeComponents:
    """OneTrainer's ``components`` module as the tab calls it: records each widget."""

    def __init__(self):
        self.widgets = []

    def section_frame(self, master, row):
        return ("frame", row)

    def label(self, frame, row, col, text, tooltip=None, **kw):
        self.widgets.append(("label", row, text, tooltip))

    def entry(self, frame, row, col, ui_state, var_name, **kw):
        self.widgets.append(("entry", row, var_name))

    def options(self, frame, row, col, values, ui_state, var_name, **kw):
        self.widgets.append(("options", row, var_name, tuple(values)))


def test_the_noise_frame_gets_the_options_below_its_own_rows(ot):
    components = FakeComponents()
    view = ot.ui.BaseTrainingTabView(components)
    view.build("master", ui_state=object())
    widgets = [w for w in components.widgets if w[0] != "label"]
    assert widgets[2:] == [("entry", 8, "immiscible_k"), ("options", 9, "immiscible_mode", immiscible.MODES),
                           ("options", 10, "immiscible_metric", immiscible.METRICS),
                           ("entry", 11, "immiscible_coarse")]
    tips = {w[2]: w[3] for w in components.widgets if w[0] == "label"}
    assert "worse" in tips["Immiscible K"] and "measure" in tips["Immiscible K"]
    assert view.components is components


def test_recording_components_track_the_frame_rows():
    inner = FakeComponents()
    rec = RecordingComponents(inner)
    frame = rec.section_frame("m", 0)
    rec.label(frame, 3, 0, "x")
    rec.label("other", 9, 0, "y")
    assert rec.frame == frame and rec.last_row == 3
    assert add_fields(inner, frame, 4, None, UI_FIELDS[:1]) == 5


def test_a_later_failure_uses_the_stock_draw_warns_once_and_is_counted(ot, monkeypatch, caplog):
    trainer, config = _start(ot, immiscible_k=8)
    _predict(ot, config, step=1)
    trainer.step(torch.zeros(()))

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(immiscible, "select_noise", broken)
    out = _predict(ot, config, step=2)
    _predict(ot, config, step=3)
    trainer.step(torch.zeros(()))
    assert torch.equal(out["noise"], torch.randn(LATENTS.shape, generator=_seeded_after_timestep(2, 2)))
    assert ADAPTER.runtime.stock_batches == 2 and ADAPTER.runtime.calls == 1
    assert sum("selection failed" in r.getMessage() for r in caplog.records) == 1
