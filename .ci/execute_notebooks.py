"""Run notebooks as `nbdev_test` does (cells flagged slow/gpu or `eval: false` are skipped) and save their outputs.

The book is read on GitHub without running it, so each chapter is committed with its small outputs.
Usage: python .ci/execute_notebooks.py [NOTEBOOK ...]   (default: every notebook in nbs/)"""
import base64, io, os, re, sys, time
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from PIL import Image
from execnb.shell import CaptureShell
from fastcore.xtras import working_directory

SKIP_FLAGS = {'slow', 'gpu'}
MAX_BYTES = 400 * 1024
MAX_WIDTH = 600  # pixels: wide enough to read on GitHub, small enough to commit

def _small_png(data: str) -> str:
    "A base64 PNG at most `MAX_WIDTH` wide with an adaptive 256-colour palette (plots and grids lose nothing visible)."
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    if image.width > MAX_WIDTH: image = image.resize((MAX_WIDTH, round(image.height * MAX_WIDTH / image.width)), Image.LANCZOS)
    buffer = io.BytesIO()
    image.convert('RGB').quantize(256).save(buffer, 'PNG', optimize=True)
    return base64.b64encode(buffer.getvalue()).decode() if buffer.tell() < len(data) * 3 / 4 else data

def _directives(source: str) -> dict[str, str]:
    return dict((m.group(1), m.group(2).strip()) for m in re.finditer(r'^#\|\s*([\w-]+:?)\s*(.*)$', source, re.M))

def _skip(cell) -> bool:
    if cell.cell_type != 'code': return True
    found = _directives(cell.source)
    return found.get('eval:', '').lower() == 'false' or bool(SKIP_FLAGS & {k.rstrip(':') for k in found})

def execute(path: Path) -> float:
    "Run `path` in a fresh shell, store the outputs in the notebook, and return the seconds it took."
    nb, start = read_nb(path), time.time()
    for cell in nb.cells:
        if cell.cell_type == 'code': cell.outputs, cell.execution_count = [], None
    os.environ['IN_TEST'] = '1'
    shell = CaptureShell(path)
    with working_directory(path.parent): shell.run_all(nb, exc_stop=True, preproc=_skip)
    for cell in nb.cells:  # progress bars and library warnings (stderr) are noise in a book
        cell['outputs'] = [o for o in cell.get('outputs', []) if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
        for output in cell.get('outputs', []):
            if 'image/png' in output.get('data', {}): output['data']['image/png'] = _small_png(output['data']['image/png'])
    write_nb(nb, path)
    return time.time() - start

if __name__ == '__main__':
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path('nbs').glob('*.ipynb'))
    for path in paths:
        seconds = execute(path)
        size = path.stat().st_size
        print(f'{path}: {seconds:.0f} s, {size / 1024:.0f} KB' + ('  (over 400 KB)' if size > MAX_BYTES else ''))
