"""The first notebook as a user sees it: JupyterLab on loopback, the notebook run in headless Chromium (Debian's
package, driven by Playwright) at the smoke preset; the progress bar and the plots render, and the checkpoint
browser's slider and label change the picture it shows. One test, bounded in time."""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "Federated_conditional_DCGAN.ipynb"
CHROMIUM = os.environ.get("FEDGAN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
RUN_TIMEOUT_S = 300  # the whole notebook at smoke takes well under a minute here
SETTINGS = {  # JupyterLab settings: no news or update checks (no outside calls), every cell in the page
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on loopback serving a copy of the notebook; stopped (its process group) afterwards."""
    folder = tmp_path / "lab"
    folder.mkdir()
    shutil.copy(REPO / NOTEBOOK, folder)
    settings = tmp_path / "settings"
    for name, values in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "FEDGAN_PRESET": "smoke", "PYTHONPATH": str(REPO), "MPLBACKEND": "module://matplotlib_inline"
           ".backend_inline", "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR":
           str(tmp_path / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")}
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--ServerApp.terminals_enabled=False",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI runs as root
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()[-3000:]
                assert time.time() < deadline, "JupyterLab did not answer within 60 s"
                time.sleep(0.5)
        yield url, token, folder
    finally:
        stop_group(server)
        with pytest.raises(ProcessLookupError):  # nothing of the group is left behind
            os.killpg(server.pid, 0)
        log.close()


def stop_group(server: subprocess.Popen) -> None:
    """TERM, then KILL, the server's process group (the server and the kernel it started: ours alone)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + 15
        while time.time() < deadline:
            server.poll()  # reaps the server, so that only live processes keep the group
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def picture(widget) -> str:
    """The source of the image the checkpoint browser shows now (a data: URL of the PNG)."""
    return widget.locator(".widget-output img").first.get_attribute("src") or ""


def wait_for_other_picture(page, widget, before: str, what: str) -> str:
    deadline = time.time() + 60
    while (now := picture(widget)) == before:
        assert time.time() < deadline, f"the checkpoint browser's picture did not change after {what}"
        page.wait_for_timeout(200)
    return now


def run_all_cells(page, prompts, attempts: int = 3) -> None:
    """Run > Run All Cells, until the cells are queued ("[*]:") or run. Under load the click can start nothing;
    clicking again is then safe, since nothing was queued."""
    for _ in range(attempts):
        page.click("li.lm-MenuBar-item:has-text('Run')")
        page.click(".lm-Menu .lm-Menu-itemLabel:text-is('Run All Cells')")
        deadline = time.time() + 30
        while time.time() < deadline:
            if any(text.strip("[]: ") for text in prompts.all_inner_texts()):
                return
            page.wait_for_timeout(200)
        page.keyboard.press("Escape")  # a menu left open
    raise AssertionError(f"Run All Cells queued no cell in {attempts} tries of 30 s")


def test_the_first_notebook_runs_in_a_real_browser_and_its_widgets_respond(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), (f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium), "
                                      "or set FEDGAN_CHROMIUM to a Chromium executable")
    url, token, folder = jupyterlab
    shots = Path(os.environ.get("FEDGAN_SCREENSHOTS") or tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
            code_cells = sum(c["cell_type"] == "code" for c in json.loads((folder / NOTEBOOK).read_text())["cells"])
            prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-prompt")
            deadline = time.time() + 60
            while prompts.count() < code_cells:  # every cell on the page before they are run
                assert time.time() < deadline, f"{prompts.count()} of {code_cells} code cells shown after 60 s"
                page.wait_for_timeout(200)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")  # the kernel is up
            run_all_cells(page, prompts)
            deadline = time.time() + RUN_TIMEOUT_S
            while True:  # every code cell shows its execution count: "[n]:"
                texts = prompts.all_inner_texts()
                if all(text.strip("[]: ").isdigit() for text in texts):
                    break
                assert "Traceback" not in "".join(page.locator(".jp-OutputArea-output").all_inner_texts())
                assert time.time() < deadline, f"not done in {RUN_TIMEOUT_S} s: prompts {texts}"
                page.wait_for_timeout(500)
            assert len(texts) == code_cells >= 10
            outputs = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
            assert "Traceback" not in outputs and "Error:" not in outputs, outputs[-3000:]
            # the tqdm bar of the rounds, full
            bar = page.locator(".widget-hbox:has(.widget-hprogress)").first
            assert re.match(r"rounds:\s*100%", bar.inner_text()), bar.inner_text()  # tqdm writes figure spaces
            assert bar.locator(".progress-bar").get_attribute("style").replace(" ", "").count("width:100%") == 1
            plots = page.locator(".jp-RenderedImage img")
            assert plots.count() >= 8
            assert all(page.evaluate("img => img.complete && img.naturalWidth > 100", plots.nth(i).element_handle())
                       for i in range(plots.count()))
            page.screenshot(path=str(shots / "browser-notebook.png"), full_page=False)
            # the checkpoint browser: a slider over the saved rounds and a dropdown of labels
            widget = page.locator(".widget-interact").last
            widget.scroll_into_view_if_needed()
            slider_readout = widget.locator(".widget-readout")
            assert slider_readout.inner_text().strip() == "2"  # the last round of the smoke preset
            first = picture(widget)
            assert first.startswith("data:image/png")
            widget.screenshot(path=str(shots / "browser-widget-round2-label0.png"))
            widget.locator(".noUi-handle").first.focus()
            page.keyboard.press("ArrowLeft")
            second = wait_for_other_picture(page, widget, first, "moving the slider to round 1")
            assert slider_readout.inner_text().strip() == "1"
            widget.screenshot(path=str(shots / "browser-widget-round1-label0.png"))
            widget.locator(".widget-dropdown select").select_option(label="7")
            wait_for_other_picture(page, widget, second, "choosing label 7")
            widget.screenshot(path=str(shots / "browser-widget-round1-label7.png"))
        finally:
            browser.close()
    assert (folder / "outputs").is_dir() and any((folder / "checkpoints").rglob("round_0002.pt"))
