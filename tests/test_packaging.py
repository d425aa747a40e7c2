"""The built wheel carries the built-in recipes, so names resolve after `pip install hfpatch`."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_builtin_recipes(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("hfpatch-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = sorted(p.stem for p in (site / "hfpatch" / "_builtin_recipes").glob("*.json"))
    assert shipped == sorted(p.stem for p in (REPO / "recipes").glob("*.json"))
    # Imported from the unpacked wheel (not this checkout), names resolve through the packaged folder.
    probe = ("import json, hfpatch; from hfpatch import recipe; "
             "print(json.dumps([str(recipe.builtin_recipes_dir()), hfpatch.Recipe.from_pretrained('token-recycling').source]))")
    env = dict(os.environ, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    folder, source = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(folder) == site / "hfpatch" / "_builtin_recipes"
    assert source == "builtin:token-recycling"
