"""The docs site and the widget app in a real browser: Debian's headless Chromium, driven by Playwright.

Each test starts its own server on a free localhost port and stops it. Skipped, with the reason, only when no
Chromium binary is found (CI installs Debian's: .ci/run). ANIME_POSE_APP_SCREENSHOT=PATH also writes the app's
screenshot there (nbs/images/app_browser.png is made that way)."""
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.error, urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get('CHROMIUM') or next(filter(None, map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome'))), None)
# flags that work in a container without a display, a GPU or the network
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync']
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason='no chromium binary found (Debian: apt-get install chromium; '
                                                         '.ci/run installs it when run as root)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextmanager
def server(command: list[str], url: str, log: Path, env: dict | None = None, timeout: float = 60):
    "Run `command` (a server) in its own process group until `url` answers; stop the group afterwards."
    with open(log, 'w') as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except urllib.error.HTTPError: break  # it answers
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f'{command[2]} did not start serving {url}:\n{log.read_text()[-3000:]}')
                time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try: process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL); process.wait()


@contextmanager
def browser_page(tmp_path: Path, origin: str, width: int = 1100, height: int = 900):
    "A page of a fresh headless Chromium (new empty profile) that may load only from `origin`; its errors are collected."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / 'profile'), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={'width': width, 'height': height})
        try:
            page = context.new_page()
            page.errors, page.blocked = [], []
            context.route('**/*', lambda route: route.continue_() if route.request.url.startswith(origin)
                          else (page.blocked.append(route.request.url), route.abort()))
            page.on('pageerror', lambda error: page.errors.append(f'page error: {error}'))
            page.on('console', lambda message: message.type == 'error' and page.errors.append(f'console: {message.text}'))
            yield page
        finally: context.close()


def loaded_images(page) -> list[list[int]]:
    "(naturalWidth, naturalHeight) of every <img> of the page that has loaded."
    return page.eval_on_selector_all('img', 'images => images.filter(i => i.complete && i.naturalWidth > 0)'
                                            '.map(i => [i.naturalWidth, i.naturalHeight])')


def local_errors(page) -> list[str]:
    "The page's errors, less the failed loads of what the route refused (the outside world: icon fonts from a CDN)."
    refused = 'console: Failed to load resource: net::ERR_FAILED'
    return [e for e in page.errors if not (page.blocked and e == refused)]


def test_docs_site_renders_in_chromium(tmp_path):
    "make_docs.py builds the whole site without installing anything; the index and a chapter render: title, figures, no error."
    fake_bin = tmp_path / 'bin'  # installers nbdev_docs would call without quarto: each records that it ran
    fake_bin.mkdir()
    for tool in ('pip', 'pip3', 'sudo', 'curl', 'dpkg'):
        (fake_bin / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >> {tmp_path}/installers.log\nexit 1\n')
        (fake_bin / tool).chmod(0o755)
    env = {**os.environ, 'PATH': f'{fake_bin}:{os.environ["PATH"]}', 'OMP_NUM_THREADS': '1'}
    site = tmp_path / 'site'
    build = subprocess.run([sys.executable, '.ci/make_docs.py', '--out', str(site)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert not (tmp_path / 'installers.log').exists(), (tmp_path / 'installers.log').read_text()
    chapters = len(list((ROOT / 'nbs').glob('*.ipynb')))
    assert f'docs: {site}/index.html ({chapters} pages)' in build.stdout and 'left empty' not in build.stdout, build.stdout
    for page in site.glob('*.html'): assert 'Traceback (most recent call last)' not in page.read_text(), page.name
    port = free_port()
    origin = f'http://127.0.0.1:{port}/'
    with server([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', str(site)],
                origin, tmp_path / 'http.log'), browser_page(tmp_path, origin) as page:
        for name, title in (('index.html', 'anime_pose'), ('app.html', 'App')):
            response = page.goto(origin + name, wait_until='load')
            assert response.status == 200
            assert page.title().startswith(title) and page.inner_text('h1.title') == title
            assert page.locator('#quarto-sidebar a[href="app.html"]').count() == 1
            assert loaded_images(page), f'{name}: no figure loaded'
            text = page.inner_text('body')
            assert 'Traceback (most recent call last)' not in text and page.locator('.cell-output-error').count() == 0
            assert page.errors == [] and page.blocked == [], f'{name}: {page.errors} {page.blocked}'
        assert page.locator('h3#posetransferapp').count() == 1  # show_doc of the app's class, found by its anchor


def test_app_in_voila_generates_in_chromium(tmp_path):
    "The widget app served by Voilà: upload a reference and a pose, click Generate, the drawn image appears."
    from anime_pose.app import synthetic_poses
    from anime_pose.synthetic import character_renderings, render_character
    render_character(character_renderings(0, 3, 1, 128)[0], 'standing', 128).image.save(tmp_path / 'reference.png')
    (tmp_path / 'pose.json').write_text(json.dumps(synthetic_poses(128)['waving'].pose.to_openpose()))
    port = free_port()
    origin = f'http://127.0.0.1:{port}/'
    jupyter = {name: str(tmp_path / 'jupyter' / name) for name in ('JUPYTER_CONFIG_DIR', 'JUPYTER_DATA_DIR', 'JUPYTER_RUNTIME_DIR')}
    env = {**os.environ, **jupyter, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
    env.pop('ANIME_POSE_MODEL', None)  # the bundled model
    command = [sys.executable, '-m', 'voila', 'app/app.ipynb', '--no-browser', f'--port={port}', '--Voila.ip=127.0.0.1',
               '--show_tracebacks=True']
    with server(command, origin + 'voila/static/', tmp_path / 'voila.log', env), \
         browser_page(tmp_path, origin, width=800, height=1000) as page:
        page.goto(origin, timeout=120_000)
        page.get_by_role('button', name='Generate').wait_for(timeout=120_000)  # the kernel has run the app's cell
        for label, path in (('reference', tmp_path / 'reference.png'), ('poses', tmp_path / 'pose.json')):
            with page.expect_file_chooser() as chooser:
                page.get_by_role('button', name=f'{label} (0)').click()
            chooser.value.set_files(str(path))
            page.get_by_role('button', name=f'{label} (1)').wait_for(timeout=30_000)
        page.get_by_text('reference.png', exact=True).wait_for(timeout=30_000)  # shown as A
        page.get_by_text('pose.json', exact=True).first.wait_for(timeout=30_000)  # its skeleton shown
        assert len(loaded_images(page)) == 2
        page.get_by_role('button', name='Generate').click()
        page.get_by_text('done: 1 image', exact=True).wait_for(timeout=120_000)
        page.wait_for_function("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length == 3")
        assert loaded_images(page)[-1] == [64, 64]  # the bundled model draws 64 x 64
        assert local_errors(page) == [], page.errors
        page.screenshot(path=tmp_path / 'app.png', full_page=True)
    if os.environ.get('ANIME_POSE_APP_SCREENSHOT'):  # the docs' picture: at most 600 px wide, 256 colours
        shot = Image.open(tmp_path / 'app.png').convert('RGB')
        shot.thumbnail((600, 10_000))
        shot.quantize(256).save(os.environ['ANIME_POSE_APP_SCREENSHOT'], optimize=True)
