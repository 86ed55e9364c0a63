"""Unit tier: the First Block Cache node's declaration (no ComfyUI needed)."""
import importlib.util
import sys
from pathlib import Path


def _nodes_package():
    """Our `nodes` package, by path: ComfyUI's own top-level `nodes` module may shadow it."""
    root = Path(__file__).resolve().parents[1] / "nodes"
    spec = importlib.util.spec_from_file_location("para_attn_nodes_pkg", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_node_declaration():
    pkg = _nodes_package()
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = pkg.NODE_CLASS_MAPPINGS, pkg.NODE_DISPLAY_NAME_MAPPINGS
    cls = NODE_CLASS_MAPPINGS["ParaAttnFirstBlockCache"]
    assert NODE_DISPLAY_NAME_MAPPINGS["ParaAttnFirstBlockCache"] == "First Block Cache"
    assert cls.CATEGORY == "para_attn" and cls.RETURN_TYPES == ("MODEL",)
    inputs = cls.INPUT_TYPES()["required"]
    assert list(inputs) == ["model", "residual_diff_threshold", "start_percent", "end_percent",
                            "max_consecutive_hits"]
    assert all(opts.get("tooltip") for _, opts in inputs.values())
    thr = inputs["residual_diff_threshold"][1]
    assert (thr["min"], thr["max"], thr["step"], thr["display"]) == (0.0, 1.0, 0.001, "slider") and thr["default"] > 0
    assert inputs["max_consecutive_hits"][1]["min"] == -1 and inputs["max_consecutive_hits"][0] == "INT"
    for name in ("start_percent", "end_percent"):
        assert inputs[name][1]["display"] == "slider"
