"""``pip install .`` (not only editable) gives a working ``detr-irpe`` with everything it needs,
the shipped configs and the kernel source included, from any folder."""
import os
import subprocess
import sys
import venv

from helpers import COCO, REPO


def test_a_wheel_install_runs_from_another_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path)
    env_dir = tmp_path / "env"
    venv.create(env_dir, system_site_packages=True, with_pip=False)  # torch & co. from this interpreter
    python = env_dir / "bin" / "python"
    wheel = next(wheels.glob("detr_irpe-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)
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
