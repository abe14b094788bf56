"""``pip install .`` (not only editable) gives a working ``detr-irpe`` with everything it needs,
the shipped configs and the kernel source included, from any folder."""
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from helpers import COCO, REPO


def venv_seeing_these_packages(env_dir: Path) -> Path:
    """A virtual environment at ``env_dir`` whose Python sees the packages of the interpreter running
    the tests (torch & co.) after its own; returns its ``python``.

    Not ``system_site_packages=True``: run from inside a virtualenv, that gives the *base*
    interpreter's packages, not this one's. Instead a ``.pth`` file adds this interpreter's purelib
    and platlib as site folders (their own ``.pth`` files included, as in a venv over a venv)."""
    venv.create(env_dir, system_site_packages=False, with_pip=False)
    python = env_dir / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    here = sysconfig.get_paths()
    folders = dict.fromkeys([here["purelib"], here["platlib"]])  # often one folder
    (Path(own) / "packages_of_the_test_runner.pth").write_text(
        "".join(f"import site; site.addsitedir({folder!r})\n" for folder in folders))
    return python


def test_a_wheel_install_runs_from_another_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    env_dir = tmp_path / "env"
    python = venv_seeing_these_packages(env_dir)
    wheel = next(wheels.glob("detr_irpe-*.whl"))
    # --ignore-installed: the runner's own detr_irpe (seen through the .pth) must not satisfy it
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = env_dir / "bin" / "detr-irpe"
    check = subprocess.run([str(script), "check-data", "--config", "demo", "--split", "val", "--no-images",
                            f"data.root={COCO}", "data.val_images=val2017",
                            "data.val_annotations=annotations/instances_val2017.json"],
                           capture_output=True, text=True, cwd=elsewhere, env=env)
    assert check.returncode == 0 and "val" in check.stdout, check.stdout + check.stderr
    probe = ("import detr_irpe, detr_irpe.irpe.native as n; from detr_irpe.apps.cli import main; "
             "print(detr_irpe.__file__, n.SOURCE.is_file()); main(['train', '--config', 'nothere'])")
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=elsewhere, env=env)
    installed, has_source = run.stdout.split()
    assert installed.startswith(str(env_dir)) and has_source == "True"  # the installed copy, kernel source too
    assert run.stderr.startswith("error: config file not found")
    assert "detr_r50_irpe_product_ctx_k_9x9" in run.stderr  # it lists the shipped configs
