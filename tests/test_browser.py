"""comfyui tier, real browser: ComfyUI's own frontend in headless Chromium (Debian `chromium`,
driven by Playwright; no downloaded browser) loads each shipped UI workflow from a server
started with the pack. For each workflow it checks: no missing node types, our nodes present
with every widget their INPUT_TYPES declare, the First Block Cache thresholds rendered as
sliders, the frontend's own graphToPrompt() equal to the API twin node by node, and no
console errors that mention our pack. It saves a screenshot of each in pytest's temporary
folder; with PARA_ATTN_UPDATE_SCREENSHOTS=1 (`make screenshots`) the FLUX ones also replace
docs/screenshots/ for the README (a plain test run leaves the checkout as it was).

Skips with the reason when Chromium, Playwright or ComfyUI is missing.
"""
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from comfy_para_attn.testing import workflow_tools

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"
NAMES = workflow_tools.workflow_names()
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLIDERS = {"ParaAttnFirstBlockCache": ["residual_diff_threshold", "start_percent", "end_percent"]}
OUR_CODE = re.compile(r"ParaAttn|para_attn|para-attn", re.IGNORECASE)
# First start of the frontend: no template browser or tutorial over the canvas.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True}

INSPECT_JS = """async (workflow) => {
  const app = window.app;
  await app.loadGraphData(workflow);
  const nodes = app.graph._nodes ?? app.graph.nodes;
  // Fit every node into the viewport for the screenshot (litegraph: screen = (pos + offset) * scale).
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const canvas = app.canvas, width = canvas.canvas.clientWidth, height = canvas.canvas.clientHeight;
  const scale = Math.min((width - 120) / (x1 - x0), (height - 120) / (y1 - y0));
  canvas.ds.scale = scale;
  canvas.ds.offset = [60 / scale - x0, 60 / scale - y0];
  canvas.setDirty(true, true);
  return nodes.map((n) => ({
    id: n.id, type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type],
    widgets: (n.widgets ?? []).map((w) => ({name: w.name, type: w.type, value: w.value})),
  }));
}"""


@pytest.fixture(scope="module")
def frontend(comfyui_path, tmp_path_factory):
    if not CHROMIUM:
        pytest.skip("Chromium not found (Debian: apt-get install chromium; or set CHROMIUM=/path/to/chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright not installed (pip install playwright)")
    from comfy_para_attn.testing.comfy_server import pack_server

    base_dir = tmp_path_factory.mktemp("comfy-base-browser")
    settings = base_dir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(FRONTEND_SETTINGS))
    with pack_server(comfyui_path, base_dir) as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1920, "height": 1080})
        console = []
        page.on("console", lambda m: console.append((m.type, m.text, m.location.get("url", ""))))
        page.on("pageerror", lambda e: console.append(("pageerror", f"{e}\n{getattr(e, 'stack', '')}", "")))
        page.goto(server.url)
        page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph",
                               timeout=120_000)
        page.keyboard.press("Escape")  # any dialog left over
        yield page, console, server
        browser.close()


@pytest.fixture(scope="module")
def object_info(frontend):
    return frontend[2].object_info()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_in_the_real_frontend(name, frontend, object_info, tmp_path_factory):
    page, console, _server = frontend
    ui, api = workflow_tools.load(name)
    errors_before = len(console)
    nodes = page.evaluate(INSPECT_JS, ui)
    page.wait_for_timeout(500)  # let the canvas draw before the screenshot
    shots = tmp_path_factory.getbasetemp() / "screenshots"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"))
    if name.startswith("flux") and os.environ.get("PARA_ATTN_UPDATE_SCREENSHOTS") == "1":
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(shots / f"{name}.png", DOCS_SCREENSHOTS / f"{name}.png")

    missing = [n["type"] for n in nodes if not n["registered"]]
    assert missing == [], f"missing node types: {missing}"
    by_type = {}
    for n in nodes:
        by_type.setdefault(n["type"], []).append(n)
    ours = {t for t in object_info if t.startswith("ParaAttn")} & {n["class_type"] for n in api.values()}
    assert ours, "no pack node in the workflow"
    for node_type in ours:
        declared = [k for group in ("required", "optional")
                    for k, spec in object_info[node_type]["input"].get(group, {}).items()
                    if isinstance(spec[0], list) or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
        for node in by_type[node_type]:
            widgets = {w["name"]: w for w in node["widgets"]}
            assert set(declared) <= set(widgets), f"{node_type}: widgets {sorted(widgets)}, declared {declared}"
            for slider in SLIDERS.get(node_type, []):
                assert widgets[slider]["type"] == "slider", f"{node_type}.{slider} is a {widgets[slider]['type']}"
            for name_, value in next(v for v in api.values() if v["class_type"] == node_type)["inputs"].items():
                if name_ in widgets:
                    assert widgets[name_]["value"] == pytest.approx(value) if isinstance(value, float) \
                        else widgets[name_]["value"] == value, f"{node_type}.{name_}"

    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert workflow_tools.compare_prompts(api, prompt) == []

    new = console[errors_before:]
    errors = [e for e in new if e[0] in ("error", "pageerror")]
    ours_errors = [e for e in console if e[0] in ("error", "pageerror", "warning") and OUR_CODE.search(" ".join(e))]
    assert ours_errors == [], ours_errors
    assert [e for e in errors if e[0] == "pageerror"] == [], errors  # loading our workflow threw
