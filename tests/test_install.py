"The install story: requirements are what the library imports, a LICENSE, one Colab cell everywhere, a wheel with the assets."
import ast, json, re, shlex, subprocess, sys, zipfile
from configparser import ConfigParser
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).parents[1]


def settings():
    config = ConfigParser(delimiters=['='])
    config.read(ROOT / 'settings.ini', encoding='utf-8')
    return config['DEFAULT']


def names(requirements: str) -> set[str]:
    return {re.split(r'[<>=!~\[; ]', r, maxsplit=1)[0].lower().replace('_', '-') for r in shlex.split(requirements)}


def imported_distributions() -> set[str]:
    "The distributions that anime_pose/*.py import (at the top or inside functions), by their package names."
    modules = set()
    for path in (ROOT / 'anime_pose').glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import): modules |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module: modules.add(node.module.split('.')[0])
            elif (isinstance(node, ast.Call) and getattr(node.func, 'attr', None) == 'import_module' and node.args
                  and isinstance(node.args[0], ast.JoinedStr)):  # importlib.import_module(f'controlnet_aux.{name}')
                modules.add(str(node.args[0].values[0].value).split('.')[0])
    found = packages_distributions()
    stdlib = set(sys.stdlib_module_names) | {'anime_pose', '__future__'}
    return {d.lower().replace('_', '-') for m in modules - stdlib for d in found.get(m, [m])}


def test_runtime_requirements_are_what_the_library_imports():
    runtime, dev = names(settings()['requirements']), names(settings()['dev_requirements'])
    optional = {'bitsandbytes', 'tensorboard', 'wandb', 'tensorboardx',  # imported only when a setting asks for them
                'mediapipe', 'opencv-contrib-python'}  # the mediapipe extra (its wheel brings its own cv2)
    missing = imported_distributions() - runtime - optional
    assert not missing, f'imported but not in requirements: {missing}'
    assert not runtime & {'nbdev', 'execnb', 'ghapi', 'fastcore', 'pytest', 'pytest-xdist', 'build'}
    assert {'nbdev', 'pytest', 'pytest-xdist', 'build'} <= dev
    assert names(settings()['tensorboard_requirements']) == {'tensorboard'}


def test_license_matches_settings():
    assert settings()['license'] == 'apache2'
    text = (ROOT / 'LICENSE').read_text()
    assert 'Apache License' in text and 'Version 2.0, January 2004' in text and 'END OF TERMS AND CONDITIONS' in text
    assert 'include LICENSE' in (ROOT / 'MANIFEST.in').read_text()


def test_no_invented_address_and_one_colab_cell_everywhere():
    cells = set()
    for notebook in (ROOT / 'nbs').glob('*.ipynb'):
        text = notebook.read_text()
        assert 'github.com/anime-pose' not in text, notebook.name
        for cell in json.loads(text)['cells']:
            source = ''.join(cell['source'])
            if 'anime_pose on Colab' in source: cells.add(source)
    assert len(cells) == 1, 'the notebooks disagree about the Colab cell'
    assert "\nANIME_POSE_SOURCE = ''\n" in cells.pop()
    for name in ('README.md', 'setup.py', 'Makefile'): assert 'github.com/anime-pose' not in (ROOT / name).read_text(), name


def test_wheel_holds_modules_assets_and_license(tmp_path):
    # --no-isolation: the setuptools of the dev extra, offline (`make wheel` builds the ordinary, isolated way)
    result = subprocess.run([sys.executable, '-m', 'build', '--wheel', '--no-isolation', '--outdir', str(tmp_path), str(ROOT)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob('anime_pose-*-py3-none-any.whl')
    files = set(zipfile.ZipFile(wheel).namelist())
    modules = {f'anime_pose/{p.name}' for p in (ROOT / 'anime_pose').glob('*.py')}
    assets = {f'anime_pose/{p.relative_to(ROOT / "anime_pose").as_posix()}'
              for p in (ROOT / 'anime_pose' / 'assets').rglob('*') if p.is_file()}
    assert modules <= files and assets <= files and assets
    assert any(f.endswith('.dist-info/licenses/LICENSE') for f in files)
    metadata = zipfile.ZipFile(wheel).read(next(f for f in files if f.endswith('.dist-info/METADATA'))).decode()
    runtime = [line for line in metadata.splitlines() if line.startswith('Requires-Dist:') and 'extra ==' not in line]
    assert runtime and not [line for line in runtime if re.search(r'nbdev|execnb|ghapi|fastcore|pytest', line)]
    assert 'Provides-Extra: tensorboard' in metadata and 'Home-page' not in metadata
