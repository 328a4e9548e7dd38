"""The layout rule of the README's Developing section, checked on the exported package:
imports of project modules only at the top of a module, only from chapters earlier in the notebook order,
and each name taken from the module that defines it. Exits 1 naming every breach."""
import ast, json, sys
from pathlib import Path

def chapter_of_module(root: Path) -> dict[str, str]:
    "Each exported module's notebook, from the `#| default_exp` cells."
    chapters = {}
    for notebook in sorted((root / 'nbs').glob('*.ipynb')):
        for cell in json.loads(notebook.read_text())['cells']:
            source = ''.join(cell['source'])
            if source.startswith('#| default_exp'): chapters[source.split()[2]] = notebook.name
    return chapters

def top_level_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)): names.add(node.name)
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names

def project_module(node: ast.ImportFrom) -> str | None:
    if node.level: return node.module or ''
    if (node.module or '').startswith('anime_pose'): return node.module.removeprefix('anime_pose').lstrip('.')
    return None

def breaches(root: Path) -> list[str]:
    chapters = chapter_of_module(root)
    trees = {path.stem: ast.parse(path.read_text()) for path in sorted((root / 'anime_pose').glob('*.py'))
             if not path.stem.startswith('_')}
    defined = {name: top_level_names(tree) for name, tree in trees.items()}
    found = []
    for name, tree in trees.items():
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and project_module(node) is not None:
                    found.append(f'{name}: imports {node.module} inside {function.name}()')
                if isinstance(node, ast.Import) and any(a.name.startswith('anime_pose') for a in node.names):
                    found.append(f'{name}: imports anime_pose inside {function.name}()')
        for node in tree.body:
            source = project_module(node) if isinstance(node, ast.ImportFrom) else None
            if not source or source not in chapters: continue
            if chapters[source] >= chapters.get(name, ''):
                found.append(f'{name} ({chapters.get(name)}) imports {source} ({chapters[source]}), a later chapter')
            found += [f'{name}: takes {alias.name} from {source}, which does not define it'
                      for alias in node.names if alias.name not in defined.get(source, {alias.name})]
    return found

if __name__ == '__main__':
    found = breaches(Path(sys.argv[1] if len(sys.argv) > 1 else '.'))
    print('\n'.join(found) or 'imports run one way, at the top of each module')
    sys.exit(1 if found else 0)
