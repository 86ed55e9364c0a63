"""Checks and rewrites of the shipped workflows (workflows/*.json), against a real server's
/object_info. Used by tests/test_workflows.py, tests/test_browser.py and scripts/main_job.py.

- `validate_api`: node types exist, input names are the node's, widget values in range.
- `ui_to_api`: an independent UI -> API conversion (widgets mapped by the node's input order
  from /object_info, links resolved), to check that each UI file and its twin agree.
- `tiny_prompt`: the API twin rewritten for a run on tiny random-weight models: file names
  swapped, text encoders replaced by the test-only ParaAttnTestConditioning node, sizes and
  steps shrunk. Everything else (our nodes and their settings) runs as shipped.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parents[2] / "workflows"
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # never part of a prompt
TEXT_ENCODER_NODES = {"DualCLIPLoader", "CLIPLoader", "TripleCLIPLoader"}
IS_LINK = list  # API format: a link is [source node id, output slot]


def workflow_names() -> list[str]:
    return sorted(p.name[: -len(".api.json")] for p in WORKFLOWS_DIR.glob("*.api.json"))


def load(name: str) -> tuple[dict, dict]:
    """(UI workflow, API twin) of a shipped workflow."""
    return (json.loads((WORKFLOWS_DIR / f"{name}.json").read_text()),
            json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text()))


def _input_specs(info: dict) -> dict:
    """name -> spec, in the node's declared order (required, then optional)."""
    specs = {}
    for group in ("required", "optional"):
        specs.update(info["input"].get(group, {}))
    return specs


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def _check_value(name: str, spec, value) -> str | None:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if kind == "COMBO" or isinstance(kind, list):
        choices = kind if isinstance(kind, list) else options.get("options", [])
        return None if value in choices else f"{name}={value!r} not among {choices[:8]}"
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and value != int(value)):
            return f"{name}={value!r} is not {kind}"
        if value < options.get("min", float("-inf")) or value > options.get("max", float("inf")):
            return f"{name}={value!r} outside [{options.get('min')}, {options.get('max')}]"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}={value!r} is not BOOLEAN"
    if kind == "STRING" and not isinstance(value, str):
        return f"{name}={value!r} is not STRING"
    return None


def validate_api(prompt: dict, object_info: dict) -> list[str]:
    """Problems of an API-format prompt against /object_info (empty when valid)."""
    problems = []
    for node_id, node in prompt.items():
        info = object_info.get(node["class_type"])
        where = f"node {node_id} ({node['class_type']})"
        if info is None:
            problems.append(f"{where}: unknown node type")
            continue
        specs = _input_specs(info)
        for name in info["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{where}: missing required input {name}")
        for name, value in node["inputs"].items():
            spec = specs.get(name)
            if spec is None:
                problems.append(f"{where}: no input named {name}")
            elif isinstance(value, IS_LINK):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"{where}: {name} links to missing node {value[0]}")
                    continue
                out_types = object_info.get(source["class_type"], {}).get("output", [])
                if value[1] >= len(out_types) or out_types[value[1]] != spec[0]:
                    problems.append(f"{where}: {name} ({spec[0]}) linked to output {value[1]} of "
                                    f"{source['class_type']} {out_types}")
            elif not _is_widget(spec):
                problems.append(f"{where}: {name} ({spec[0]}) needs a link, has {value!r}")
            elif (error := _check_value(name, spec, value)) is not None:
                problems.append(f"{where}: {error}")
    return problems


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert an editor-format workflow to the API format without the frontend."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info[node["type"]]
        inputs = {}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        for name, spec in _input_specs(info).items():
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
                if _is_widget(spec) and values:  # a widget converted to an input keeps its slot
                    values.pop(0)
                continue
            if not _is_widget(spec) or not values:
                continue
            inputs[name] = values.pop(0)
            options = spec[1] if len(spec) > 1 else {}
            if options.get("control_after_generate") and values:
                values.pop(0)  # "fixed" / "randomize": the frontend's, not an input
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"]}
    return prompt


def compare_prompts(expected: dict, actual: dict) -> list[str]:
    """Node-by-node differences (class types, every input value and link); _meta ignored."""
    diffs = []
    for node_id in sorted(set(expected) | set(actual), key=lambda k: int(k) if k.isdigit() else k):
        a, b = expected.get(node_id), actual.get(node_id)
        if a is None or b is None:
            diffs.append(f"node {node_id}: only in {'actual' if a is None else 'expected'}")
            continue
        if a["class_type"] != b["class_type"]:
            diffs.append(f"node {node_id}: {a['class_type']} vs {b['class_type']}")
            continue
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            va, vb = a["inputs"].get(name, "<absent>"), b["inputs"].get(name, "<absent>")
            if isinstance(va, list) and isinstance(vb, list):
                va, vb = [str(va[0]), va[1]], [str(vb[0]), vb[1]]
            if va != vb and not (isinstance(va, (int, float)) and isinstance(vb, (int, float))
                                 and abs(va - vb) <= 1e-9 * max(1.0, abs(va))):
                diffs.append(f"node {node_id} ({a['class_type']}).{name}: {va!r} vs {vb!r}")
    return diffs


# -- rewriting for a run on tiny models ----------------------------------------------------

# Small but real: the latent is split across 2 ranks and, for Parallel VAE Decode, into 2
# tiles (64 px with no overlap, the smallest tile the node allows).
TINY_SIZES = {
    "EmptySD3LatentImage": {"width": 128, "height": 64},
    "EmptyHunyuanLatentVideo": {"width": 128, "height": 64, "length": 1},
    "Wan22ImageToVideoLatent": {"width": 128, "height": 64, "length": 1},
    "ParaAttnParallelVAEDecode": {"tile_size": 64, "overlap": 0},
    "VAEDecodeTiled": {"tile_size": 64, "overlap": 0},
}


def tiny_prompt(prompt: dict, substitutes: dict, *, steps: int = 4, prefix: str | None = None,
                overrides: dict | None = None) -> dict:
    """The API prompt rewritten for tiny random-weight models (see module docstring).

    substitutes: {real file name: tiny file name}; overrides: {class_type: {input: value}}
    applied last (e.g. {"ParaAttnCompile": {"scope": "off"}})."""
    out = copy.deepcopy(prompt)
    loader = next((k for k, n in out.items() if n["class_type"] == "UNETLoader"), None)
    for node_id, node in list(out.items()):
        inputs = node["inputs"]
        for name, value in inputs.items():
            if isinstance(value, str) and value in substitutes:
                inputs[name] = substitutes[value]
        if node["class_type"] in TEXT_ENCODER_NODES:
            del out[node_id]
        elif node["class_type"] == "CLIPTextEncode":
            # Same node id, so every link to it stays valid.
            out[node_id] = {"class_type": "ParaAttnTestConditioning",
                            "inputs": {"model": [loader, 0], "text": inputs["text"], "tokens": 8},
                            "_meta": {"title": "Test conditioning (replaces CLIPTextEncode)"}}
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            # A KSamplerAdvanced's step range keeps its share of the schedule (Wan 2.2's experts
            # split it); "to the end" (>= the steps) stays.
            for key in ("start_at_step", "end_at_step"):
                if isinstance(inputs.get(key), int) and inputs[key] < inputs["steps"]:
                    inputs[key] = round(inputs[key] * steps / inputs["steps"])
            inputs["steps"] = steps
        if "filename_prefix" in inputs and prefix:
            inputs["filename_prefix"] = prefix
        inputs.update(TINY_SIZES.get(node["class_type"], {}))
        inputs.update((overrides or {}).get(node["class_type"], {}))
    return out


def node_ids(prompt: dict, class_type: str) -> list[str]:
    return [k for k, n in prompt.items() if n["class_type"] == class_type]


# Loader inputs naming model files, and the models/ folder each reads from.
_MODEL_FILE_INPUTS = {("UNETLoader", "unet_name"): "diffusion_models", ("VAELoader", "vae_name"): "vae",
                      ("DualCLIPLoader", "clip_name1"): "text_encoders",
                      ("DualCLIPLoader", "clip_name2"): "text_encoders",
                      ("CLIPLoader", "clip_name"): "text_encoders",
                      ("ControlNetLoader", "control_net_name"): "controlnet"}


def shipped_model_files() -> dict:
    """{models folder: [file names]} the shipped workflows load (flux1-dev.safetensors, ...)."""
    files = {}
    for name in workflow_names():
        for node in load(name)[1].values():
            for name_key, value in node["inputs"].items():
                folder = _MODEL_FILE_INPUTS.get((node["class_type"], name_key))
                if folder and value not in files.setdefault(folder, []):
                    files[folder].append(value)
    return files


def shipped_input_images() -> list[str]:
    """Image names the shipped workflows' LoadImage nodes read from ComfyUI's input/ folder."""
    return sorted({node["inputs"]["image"] for name in workflow_names() for node in load(name)[1].values()
                   if node["class_type"] == "LoadImage"})


def write_input_images(input_dir: Path | str, size: tuple[int, int] = (96, 64)) -> None:
    """A test picture (rectangles and a disc on a gradient: Canny finds edges in it) under each
    name `shipped_input_images` lists, where no file of that name exists."""
    import numpy as np
    from PIL import Image

    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([x / width, y / height, 0.5 + 0 * x], axis=-1)
    picture[height // 4: height // 2, width // 5: width // 2] = (0.9, 0.1, 0.1)
    picture[(x - 0.7 * width) ** 2 + (y - 0.6 * height) ** 2 < (height / 4) ** 2] = (0.1, 0.2, 0.9)
    for name in shipped_input_images():
        path = Path(input_dir) / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((picture * 255).astype(np.uint8)).save(path)
