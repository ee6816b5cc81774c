"""immiscible_host.envinstall (issue 17 items 2, 6, 7): the install marker and every file written
atomically and recovered when unreadable, a --python that is not a usable Python named with what ran
and what came back, the pack's imports verified in the target before the start-up hook is written,
and no interruption leaving a hook that points at a pack that does not import.

The real-interpreter tests run throwaway venvs (``python -m venv --without-pip``: no torch, numpy or
pip) and the Pythons of pyenv when there are any; the rest fake the target's answer as the adapters'
installer tests do."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from immiscible_host import envinstall

REPO = Path(__file__).resolve().parent.parent
PKG = "kohya_patch"
PTH, MARKER = "immiscible_kohya_startup.pth", "immiscible_kohya_install.json"
LINE = envinstall.pth_line(PKG, "sd-scripts")


class Said(list):
    def __call__(self, msg):
        self.append(msg)

    @property
    def text(self):
        return "\n".join(self)


# --------------------------------------------------------------------------- a faked target environment


class Target:
    """The answer of a target interpreter, with pip acting on it: the pack imports once pip installed
    it (or from the start), ``immiscible`` too unless a dependency is missing."""

    def __init__(self, site: Path, installed=False, dist=None, missing=(), pip=True):
        self.site, self.installed, self.dist, self.missing, self.has_pip = site, installed, dist, list(missing), pip
        self.pips = []

    def probe(self, python, package, external=()):
        own = self.installed
        info = {"python": python, "version": "3.11.7", "site_packages": str(self.site), "torch": None,
                "hook_active": own and (self.site / PTH).exists(), "dist": self.dist, "pip": self.has_pip,
                "external": {}, "import_errors": {}, "missing_modules": {},
                "missing_dependencies": list(self.missing),
                package: str(REPO / package / "__init__.py") if own else None,
                "immiscible_host": str(REPO / "immiscible_host/__init__.py") if own else None,
                "immiscible": str(REPO / "immiscible/__init__.py") if own and not self.missing else None}
        for name in (package, "immiscible_host", "immiscible"):
            if info[name] is None:
                lacks = name if not own else self.missing[0]
                info["import_errors"][name] = f"ModuleNotFoundError: No module named '{lacks}'"
                info["missing_modules"][name] = lacks
        return info

    def pip(self, python, say, *args):
        self.pips.append(args)
        if args[0] == "install":
            self.installed, self.dist = True, self.dist or "0.2.0"
        elif args[0] == "uninstall":
            self.installed, self.dist = False, None
        return 0

    def pack_imports(self):
        return self.installed and not self.missing


@pytest.fixture
def target(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    t = Target(site)
    monkeypatch.setattr(envinstall, "probe", lambda python, package, external=(): t.probe(python, package, external))
    monkeypatch.setattr(envinstall, "pip", lambda python, say, *args: t.pip(python, say, *args))
    return t


def install(say, **record):
    return envinstall.install("/venv/bin/python", PKG, PTH, MARKER, LINE, say, **record)


def uninstall(say):
    return envinstall.uninstall("/venv/bin/python", PKG, PTH, MARKER, say)


def check(target, say):
    info = target.probe("/venv/bin/python", PKG)
    return envinstall.report_environment(info, PKG, PTH, "install.py --sd-scripts", say)


# --------------------------------------------------------------------------- item 2: the marker


@pytest.mark.parametrize("content", [b"", b"\n", b'{"pip_installed": tr', b"[1, 2]", b"\xff\xfe garbage"])
def test_an_unreadable_marker_is_rewritten_by_install(target, content):
    """An interrupted write of an older version leaves the marker empty or cut: install mends it."""
    target.installed, target.dist = True, "0.2.0"
    (target.site / MARKER).write_bytes(content)
    said = Said()
    assert install(said, sd_scripts="/sd") == 0
    assert f"install marker {target.site / MARKER} is unreadable" in said.text
    kept = json.loads((target.site / MARKER).read_text())
    assert kept["sd_scripts"] == "/sd" and kept["pip_installed"] is None  # unknown, and recorded as such
    assert (target.site / PTH).read_text() == LINE


def test_an_unreadable_marker_is_removed_by_uninstall_with_the_hook(target):
    target.installed, target.dist = True, "0.2.0"
    (target.site / PTH).write_text(LINE)
    (target.site / MARKER).write_text("")
    said = Said()
    assert uninstall(said) == 0
    assert not any(target.site.iterdir()) and target.pips == []  # the pack is left: nobody knows if it was ours
    assert f"install marker {target.site / MARKER} is unreadable (it is empty)" in said.text
    assert "whether install.py pip-installed it is unknown" in said.text
    assert "pip uninstall -y immiscible-diffusion" in said.text


def test_a_rebuilt_marker_keeps_the_pack_on_uninstall_and_says_why(target):
    target.installed, target.dist = True, "0.2.0"
    (target.site / MARKER).write_text("{")
    assert install(Said()) == 0
    said = Said()
    assert uninstall(said) == 0 and target.pips == [] and "unknown" in said.text
    assert not any(target.site.iterdir())


def test_check_reports_an_unreadable_marker(target):
    target.installed = True
    (target.site / PTH).write_text(LINE)
    said = Said()
    assert check(target, said) is True and "install marker" not in said.text  # a normal install: unchanged
    (target.site / MARKER).write_text("")
    said = Said()
    assert check(target, said) is False
    assert f"install marker: {target.site / MARKER} is UNREADABLE (it is empty)" in said.text
    assert "run install.py --sd-scripts again" in said.text
    assert envinstall.read_marker(str(target.site), MARKER) == {}


def test_load_marker_says_why():
    assert envinstall.load_marker(Path("/nonexistent/x.json")) == ({}, None)


def test_write_atomic_replaces_whole_files_and_keeps_permissions(tmp_path, monkeypatch):
    path = tmp_path / "a.pth"
    envinstall.write_atomic(path, "one\n")
    assert path.read_text() == "one\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600: other users read .pth files
    path.chmod(0o640)
    envinstall.write_atomic(path, "two\n")
    assert path.read_text() == "two\n" and stat.S_IMODE(path.stat().st_mode) == 0o640

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        envinstall.write_atomic(path, "three\n")
    assert path.read_text() == "two\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.pth"]


def test_temporaries_of_an_interrupted_write_are_cleaned_up(target):
    """SIGKILL during write_atomic leaves ``.NAME.PID.tmp`` (never a ``*.pth``): the next run removes it."""
    (target.site / f".{PTH}.4242.tmp").write_text(LINE[:10])
    (target.site / f".{MARKER}.4242.tmp").write_text("{")
    target.installed = True
    assert install(Said()) == 0
    assert sorted(p.name for p in target.site.iterdir()) == sorted([PTH, MARKER])
    (target.site / f".{MARKER}.4243.tmp").write_text("{")
    assert uninstall(Said()) == 0 and not any(target.site.iterdir())


# --------------------------------------------------------------------------- item 7: the pack must import


def test_install_refuses_when_a_dependency_is_missing_and_check_fails(target):
    """A venv without numpy: no hook is written, the dependency is named, --check fails."""
    target.installed, target.dist, target.missing = True, "0.2.0", ["numpy"]
    said = Said()
    assert install(said) == 1
    assert "ERROR: the pack does not import in /venv/bin/python" in said.text
    assert "numpy is not installed in that environment" in said.text
    assert "/venv/bin/python -m pip install numpy" in said.text
    assert not (target.site / PTH).exists() and not (target.site / MARKER).exists()
    (target.site / PTH).write_text(LINE)  # an earlier install, numpy removed since
    said = Said()
    assert check(target, said) is False
    assert "pack: BROKEN, `import immiscible` fails there (ModuleNotFoundError: No module named 'numpy')" in said.text
    said = Said()
    assert install(said) == 1 and "left as it was" in said.text and (target.site / PTH).read_text() == LINE


def test_a_pip_install_whose_pack_does_not_import_is_undone(target):
    """pip --no-deps installs the pack but not torch: the install of this run is taken back."""
    target.missing = ["torch", "numpy"]
    said = Said()
    assert install(said) == 1
    assert target.pips == [("install", "--no-deps", "--no-build-isolation", "-e", str(envinstall.PACK_DIR)),
                           ("uninstall", "-y", envinstall.DIST_NAME)]
    assert "torch, numpy are not installed" in said.text and "the build for your CUDA" in said.text
    assert not any(target.site.iterdir()) and not target.installed


def test_a_target_without_pip_is_named(target):
    target.has_pip = False
    said = Said()
    assert install(said) == 1 and "has no pip" in said.text and "ensurepip" in said.text
    assert not any(target.site.iterdir()) and target.pips == []


def test_another_copy_of_immiscible_is_refused(target, monkeypatch):
    target.installed = True
    probe = target.probe
    monkeypatch.setattr(envinstall, "probe", lambda python, package, external=(): {
        **probe(python, package), "immiscible": "/elsewhere/site-packages/immiscible/__init__.py"})
    said = Said()
    assert install(said) == 1 and "another copy of immiscible: /elsewhere" in said.text
    assert not any(target.site.iterdir())


# --------------------------------------------------------------------------- interruptions


class Killed(BaseException):
    """SIGKILL: nothing after it runs (no ``except Exception``, no ``finally`` that writes)."""


@pytest.mark.parametrize("missing", [[], ["numpy"]])
def test_no_interruption_leaves_a_hook_to_a_pack_that_does_not_import(target, monkeypatch, missing):
    """Kill the install at every step it takes (each file write, pip call and probe), then check the
    state, then uninstall: a hook is only ever there when the pack imports, and uninstall cleans up."""
    write, pip, probe = envinstall.write_atomic, envinstall.pip, envinstall.probe
    steps = 0
    while True:
        for p in target.site.iterdir():
            p.unlink()
        target.installed, target.dist, target.missing, target.pips = False, None, list(missing), []
        budget = [steps]

        def step(fn):
            def run(*a, **kw):
                if budget[0] == 0:
                    raise Killed
                budget[0] -= 1
                return fn(*a, **kw)
            return run

        monkeypatch.setattr(envinstall, "write_atomic", step(write))
        monkeypatch.setattr(envinstall, "pip", step(pip))
        monkeypatch.setattr(envinstall, "probe", step(probe))
        try:
            install(Said())
            finished = True
        except Killed:
            finished = False
        if (target.site / PTH).exists():
            assert target.pack_imports() and (target.site / PTH).read_text() == LINE
        monkeypatch.setattr(envinstall, "write_atomic", write)
        monkeypatch.setattr(envinstall, "pip", pip)
        monkeypatch.setattr(envinstall, "probe", probe)
        assert uninstall(Said()) == 0
        assert not any(target.site.iterdir()) and not target.installed, f"killed after {steps} steps"
        if finished:
            break
        steps += 1
    assert steps >= 4


# --------------------------------------------------------------------------- item 6: --python


@pytest.fixture
def scripts(tmp_path):
    def make(name, body, mode=0o755):
        path = tmp_path / name
        path.write_text(body)
        path.chmod(mode)
        return str(path)
    return make


def probe_error(python):
    with pytest.raises(RuntimeError) as info:
        envinstall.probe(python, PKG)
    msg = str(info.value)
    assert msg.startswith(f"cannot use {python} as the target Python: ") and "--python must name" in msg
    return msg


def test_a_program_that_prints_nothing_is_named():
    assert "`/bin/true -c <probe script>` exited with 0 and printed nothing (it is not a Python interpreter)" \
        in probe_error("/bin/true")


def test_a_missing_python_a_folder_and_a_non_executable(tmp_path, scripts):
    assert "no such file" in probe_error(str(tmp_path / "nope"))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").symlink_to(sys.executable)
    assert f"it is a folder, not a Python interpreter (did you mean {venv / 'bin/python'}?)" in probe_error(str(venv))
    assert "it is not executable" in probe_error(scripts("plain", "print(1)\n", mode=0o644))
    (tmp_path / "gone").symlink_to(tmp_path / "moved-python")
    assert f"it is a link to {tmp_path / 'moved-python'}, which does not exist" in probe_error(str(tmp_path / "gone"))
    assert "first line #!/nonexistent/python names an interpreter that cannot be run" in probe_error(
        scripts("shebang", "#!/nonexistent/python\n"))


def test_garbage_crashes_and_a_malformed_answer(scripts):
    msg = probe_error(scripts("garbage", "#!/bin/sh\necho hello there\n"))
    assert 'exited with 0 and printed no probe answer: stdout "hello there"' in msg
    msg = probe_error(scripts("crash", "#!/bin/sh\necho 'Traceback' >&2\necho 'ImportError: bad' >&2\nexit 3\n"))
    assert 'exited with 3 and printed no probe answer: stderr "Traceback | ImportError: bad"' in msg
    assert 'is not JSON: "@@{cut' in probe_error(scripts("cut", "#!/bin/sh\necho '@@{cut'\n"))
    assert "was killed by signal 9" in probe_error(scripts("killed", "#!/bin/sh\nkill -9 $$\n"))


def test_a_python_that_waits_for_input_gets_none(scripts):
    """The probe's stdin is closed: a program reading it ends instead of hanging the installer."""
    assert "printed nothing" in probe_error(scripts("reads", "#!/bin/sh\ncat > /dev/null\n"))


def test_a_too_old_python_is_named_with_its_version(scripts):
    """A fake Python 3.8: the real interpreter with ``sys.version_info`` set back, as the guard sees it."""
    fake = scripts("python3.8", f"""#!/bin/sh
shift
exec {sys.executable} -c 'import sys; sys.version_info = (3, 8, 10, "final", 0); sys.version = "3.8.10 (fake)"; \
code = sys.argv[1]; sys.argv = ["-c"] + sys.argv[2:]; exec(compile(code, "-c", "exec"))' "$@"
""")
    assert "it is Python 3.8.10; the pack needs Python 3.10 or newer" in probe_error(fake)


PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"


@pytest.mark.parametrize("version", ["2.7", "3.6", "3.9"])
def test_a_real_old_python_is_named_with_its_version(version):
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version[0]}"))
    if not found:
        pytest.skip(f"no Python {version} under {PYENV}")
    assert f"it is Python {version}." in probe_error(str(found[-1]))


# --------------------------------------------------------------------------- real throwaway venvs


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    """A venv with no torch, no numpy and no pip (``--without-pip`` takes a second)."""
    root = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    return str(python), Path(site)


@pytest.fixture
def bare(bare_venv):
    python, site = bare_venv
    yield python, site
    for p in site.iterdir():
        if p.suffix in (".pth", ".json") or p.name.endswith(".tmp"):
            p.unlink()


def test_real_venv_without_the_pack_or_pip(bare):
    python, site = bare
    said = Said()
    assert envinstall.install(python, PKG, PTH, MARKER, LINE, said) == 1
    assert f"ERROR: {python} has no pip" in said.text and not (site / PTH).exists()


@pytest.mark.slow
def test_real_venv_without_torch_and_numpy(bare):
    """The pack is on the venv's path (an editable install does that with a .pth), its dependencies
    are not: install writes no hook and names them, --check fails and names them too."""
    python, site = bare
    (site / "__editable___immiscible.pth").write_text(str(REPO) + "\n")
    said = Said()
    assert envinstall.install(python, PKG, PTH, MARKER, LINE, said) == 1
    assert "`import immiscible` fails there (ModuleNotFoundError: No module named 'torch')" in said.text
    assert "torch, numpy are not installed in that environment" in said.text
    assert not (site / PTH).exists() and not (site / MARKER).exists()
    (site / PTH).write_text(LINE)
    info = envinstall.probe(python, PKG)
    said = Said()
    assert envinstall.report_environment(info, PKG, PTH, "install.py --sd-scripts", said) is False
    assert "pack: BROKEN" in said.text and "torch, numpy" in said.text


@pytest.mark.slow
def test_real_venv_with_its_dependencies_gets_an_active_hook(bare, tmp_path, monkeypatch):
    """A pack whose adapter's start-up installs an ImportHook, in a venv that sees torch and numpy: the
    hook is written only after the pack imports there, and is active at the venv's next start-up."""
    pack = tmp_path / "pack"
    for name in ("immiscible", "immiscible_host"):
        shutil.copytree(REPO / name, pack / name, ignore=shutil.ignore_patterns("__pycache__"))
    (pack / "fake_adapter").mkdir()
    (pack / "fake_adapter/__init__.py").write_text("")
    (pack / "fake_adapter/startup.py").write_text(
        "from immiscible_host.hook import ImportHook\nImportHook('fake_adapter', {}, lambda m: None).install()\n")
    monkeypatch.setattr(envinstall, "PACK_DIR", pack.resolve())
    python, site = bare
    deps = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (site / "__editable___immiscible.pth").write_text(f"{pack}\n{deps}\n")
    pth, marker, line = "immiscible_fake_startup.pth", "immiscible_fake_install.json", \
        envinstall.pth_line("fake_adapter", "fake")
    said = Said()
    assert envinstall.install(python, "fake_adapter", pth, marker, line, said, fake="/x") == 0, said.text
    assert (site / pth).read_text() == line and json.loads((site / marker).read_text())["fake"] == "/x"
    info = envinstall.probe(python, "fake_adapter")
    said = Said()
    assert envinstall.report_environment(info, "fake_adapter", pth, "install.py --fake", said) is True, said.text
    assert info["hook_active"] and info["immiscible"].startswith(str(pack))
    assert envinstall.uninstall(python, "fake_adapter", pth, marker, Said()) == 0
    assert not (site / pth).exists() and not (site / marker).exists()


def test_a_folder_that_cannot_be_written_is_named_and_nothing_changes(target, monkeypatch):
    def denied(path, *a):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError, match=f"cannot write {target.site / MARKER}: Permission denied .*"
                                              f"can this user write to {target.site}"):
        install(Said())
    assert not any(target.site.iterdir()) and target.pips == []


@pytest.mark.parametrize("short", ["kohya", "musubi"])
def test_both_adapters_markers_take_the_same_path(target, short):
    """musubi-tuner's marker is read, reported and recovered by the same code."""
    pth, marker = f"immiscible_{short}_startup.pth", f"immiscible_{short}_install.json"
    target.installed, target.dist = True, "0.2.0"
    (target.site / pth).write_text(LINE)
    (target.site / marker).write_text("{")
    said = Said()
    info = target.probe("/venv/bin/python", PKG)
    assert envinstall.report_environment(info, PKG, pth, f"install.py --{short}", said) is False
    assert f"{target.site / marker} is UNREADABLE" in said.text
    assert envinstall.install("/venv/bin/python", PKG, pth, marker, LINE, Said()) == 0
    assert json.loads((target.site / marker).read_text())["pip_installed"] is None
    (target.site / marker).write_text("")
    assert envinstall.uninstall("/venv/bin/python", PKG, pth, marker, Said()) == 0
    assert not any(target.site.iterdir())


def test_a_failed_pip_install_leaves_nothing(target, monkeypatch):
    monkeypatch.setattr(envinstall, "pip", lambda python, say, *args: target.pips.append(args) or 1)
    said = Said()
    assert install(said) == 1 and "pip install -e" in said.text and "failed (exit 1)" in said.text
    assert not any(target.site.iterdir()) and [a[0] for a in target.pips] == ["install"]
    (target.site / MARKER).write_text('{"sd_scripts": "/old"}')  # an earlier marker is given back as it was
    assert install(Said()) == 1 and json.loads((target.site / MARKER).read_text()) == {"sd_scripts": "/old"}
