"""Write README.md from nbs/index.ipynb (nbdev's convention), without quarto.

nbdev_readme renders through quarto, whose installer downloads a binary at build time; this
renders the same notebook directly: markdown cells as they are, visible code cells as Python
blocks with their text outputs, images found from the repository root. `--check` exits 1 when
README.md is out of date.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def is_hidden(source: str) -> bool:
    return any(line.strip() in ('#| hide', '#|hide') or line.startswith('#| export') for line in source.splitlines())

def render(notebook: Path) -> str:
    parts = []
    for cell in json.loads(notebook.read_text(encoding='utf-8'))['cells']:
        source = ''.join(cell['source'])
        if cell['cell_type'] == 'markdown': parts.append(source.replace('](images/', '](nbs/images/'))
        elif cell['cell_type'] == 'code' and not is_hidden(source):
            parts.append(f'```python\n{source}\n```')
            for output in cell.get('outputs', []):
                text = ''.join(output.get('text', '') or output.get('data', {}).get('text/plain', ''))
                if text: parts.append(f'    {text.rstrip()}'.replace('\n', '\n    '))
    return '\n\n'.join(parts).strip() + '\n'

if __name__ == '__main__':
    readme, text = root / 'README.md', render(root / 'nbs' / 'index.ipynb')
    if '--check' in sys.argv[1:]:
        if readme.read_text(encoding='utf-8') != text: sys.exit('README.md is out of date: run make readme')
    else: readme.write_text(text, encoding='utf-8')
