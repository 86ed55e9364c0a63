"""Unit tier: objects of modules that ComfyUI names by their file path (comfy_extras, custom
node packs) pickled for another process, which cannot import them by that name."""
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from comfy_para_attn import refs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_like_comfyui(package_dir: str):
    """ComfyUI's load_custom_node for a directory: the module is named by its path."""
    name = package_dir.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(package_dir, "__init__.py"),
                                                  submodule_search_locations=[package_dir])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_a_custom_node_packs_sampler_travels_to_a_fresh_process(tmp_path):
    pack = tmp_path / "my.sampler_pack"  # a dot, as in "ComfyUI-Foo.git" checkouts
    (pack / "samplers").mkdir(parents=True)
    (pack / "__init__.py").write_text("from .samplers.euler import sample_twice, Options\n")
    (pack / "samplers" / "__init__.py").write_text("")
    (pack / "samplers" / "scale.py").write_text("FACTOR = 2.5\n")
    (pack / "samplers" / "euler.py").write_text(textwrap.dedent("""
        from .scale import FACTOR

        def sample_twice(x):
            return x * FACTOR

        class Options:
            def __init__(self, eta):
                self.eta = eta
    """))
    module = _load_like_comfyui(str(pack))
    try:
        payload = {"fn": module.sample_twice, "options": module.Options(0.7), "plain": [1, 2]}
        assert "/" in module.sample_twice.__module__
        data = refs.dumps(payload)
        script = textwrap.dedent(f"""
            import pickle, sys
            sys.path.insert(0, {ROOT!r})
            payload = pickle.loads(sys.stdin.buffer.read())
            print(payload["fn"](4), type(payload["options"]).__name__, payload["options"].eta, payload["plain"])
        """)
        done = subprocess.run([sys.executable, "-c", script], input=data, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert done.stdout.decode().split() == ["10.0", "Options", "0.7", "[1,", "2]"]
        # plain pickle names the module by its path: the other process cannot import it
        plain = pickle.dumps(payload)
        failed = subprocess.run([sys.executable, "-c", script], input=plain, capture_output=True, timeout=120)
        assert failed.returncode != 0 and b"No module named" in failed.stderr
    finally:
        for name in [n for n in sys.modules if n.startswith(str(pack).replace(".", "_x_"))]:
            del sys.modules[name]


def test_importable_objects_pickle_as_before():
    data = refs.dumps({"fn": os.path.join, "cls": refs.ObjectRef})
    assert pickle.loads(data) == {"fn": os.path.join, "cls": refs.ObjectRef}
    assert b"resolve" not in data


def test_object_patches_of_local_classes_travel_whole_when_they_pickle():
    """A torch.fx GraphModule's class is local and pickles with its code, as it is; a local
    class that only combines its bases travels as those bases and its state; a local class
    with a method of its own cannot be made again, and fails as plain pickle fails."""
    import torch.fx

    from comfy_para_attn.adapters.comfy.portable import portable_object_patches

    def local_module(own_forward: bool):
        class Shifted(torch.nn.Module):
            def forward(self, x):
                return x + 1

        class Mixed(torch.nn.Identity):
            pass

        return Shifted() if own_forward else Mixed()

    traced = torch.fx.symbolic_trace(local_module(True))
    sent = pickle.loads(refs.dumps(portable_object_patches({"traced": traced, "mixed": local_module(False)})))
    x = torch.randn(3)
    assert torch.equal(sent["traced"](x), x + 1)
    assert type(sent["mixed"]).__bases__ == (torch.nn.Identity,) and torch.equal(sent["mixed"](x), x)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        refs.dumps(local_module(True))


def test_a_local_class_of_a_path_named_module_travels_as_its_bases(tmp_path):
    """ComfyUI's ModelSampling nodes patch in an instance of a class made inside the node's
    function, in a module named by its path (comfy_extras): no name reaches that class, so it
    travels as its bases (by file) and state (it was sent as a reference to
    "patch.<locals>.Advanced", which no worker could resolve: every multi-GPU HunyuanVideo and
    Wan workflow failed)."""
    from comfy_para_attn.adapters.comfy.portable import portable_object_patches

    pack = tmp_path / "sampling.pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(textwrap.dedent("""
        import torch

        class Doubling(torch.nn.Module):
            def forward(self, x):
                return x * 2

        def patch():
            class Advanced(Doubling):
                pass
            return Advanced()
    """))
    module = _load_like_comfyui(str(pack))
    try:
        patched = module.patch()
        with pytest.raises((pickle.PicklingError, AttributeError)):
            pickle.dumps(patched)  # by name: "patch.<locals>.Advanced", which no worker can resolve
        sent = portable_object_patches({"model_sampling": patched})
        script = textwrap.dedent(f"""
            import pickle, sys, torch
            sys.path.insert(0, {ROOT!r})
            module = pickle.loads(sys.stdin.buffer.read())["model_sampling"]
            print(type(module).__name__, module(torch.ones(2)).tolist())
        """)
        done = subprocess.run([sys.executable, "-c", script], input=refs.dumps(sent), capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert done.stdout.decode().split() == ["Advanced", "[2.0,", "2.0]"]
    finally:
        for name in [n for n in sys.modules if n.startswith(str(pack).replace(".", "_x_"))]:
            del sys.modules[name]


class AnswersEveryName:
    """Like newer ComfyUI's model configs: a missing attribute is None (they log a warning)."""

    def __init__(self):
        self.unet_config = {"depth": 2}
        self.optimizations = {"fp8": False}

    def __getattr__(self, name):
        return None


class KeepsItsOwnState(AnswersEveryName):
    def __getstate__(self):
        return {"unet_config": "from getstate"}

    def __setstate__(self, state):
        self.__dict__.update(state, restored=True)


def test_an_object_that_answers_every_attribute_travels():
    """Unpickling looks up `__setstate__`, which such a class answers with None: the
    payload of every Context Parallel prompt on newer ComfyUI failed with "'NoneType' object
    is not callable". It travels as its class and dict; a class with its own state protocol
    keeps it."""
    config = AnswersEveryName()
    copy = pickle.loads(refs.dumps({"model_config": config}))["model_config"]
    assert type(copy) is AnswersEveryName and copy.__dict__ == config.__dict__ and copy.anything is None
    own = pickle.loads(refs.dumps(KeepsItsOwnState()))
    assert own.__dict__ == {"unet_config": "from getstate", "restored": True}


class AttributeDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class SlottedAnswersEveryName:
    __slots__ = ("a",)

    def __init__(self):
        self.a = 1

    def __getattr__(self, name):
        return None


def test_objects_with_a_getattr_keep_what_pickle_keeps():
    """The reduction above is pickle's own (items of a dict subclass, slots), only its state is
    set without asking the instance for `__setstate__`."""
    copy = pickle.loads(refs.dumps(AttributeDict(a=1, b=[2])))
    assert type(copy) is AttributeDict and copy == {"a": 1, "b": [2]} and copy.b == [2]
    slotted = pickle.loads(refs.dumps(SlottedAnswersEveryName()))
    assert type(slotted) is SlottedAnswersEveryName and slotted.a == 1


class MakesItsPreviewFunction:
    """Like newer ComfyUI's FLUX.2 latent format: its constructor keeps a lambda."""

    def __init__(self):
        self.channels = 128
        self.reshape = lambda t: t * self.channels


def _guidance_patch(scale, tensor):
    """Like ComfyUI's CFGZeroStar / Skip Layer Guidance nodes: the patch is a closure."""
    later = None

    def patch(args):
        return args["denoised"] * scale + tensor.sum() + (later(args) if later else 0) + _module_level_helper()

    def again(args):
        return 0.5 if patch is not None else 0.0  # refers to the other closure, which refers back

    later = again if scale < 0 else None
    return patch


def _module_level_helper():
    return 1.0


def test_functions_defined_inside_functions_travel_by_value(tmp_path):
    """Guidance patches of ComfyUI's own nodes are closures: plain pickle cannot name them.
    They travel by code and closure (tensors, other closures, a cycle, a lambda kept by an
    object) and compute the same in a fresh process, their globals read from their module."""
    obj = MakesItsPreviewFunction()
    obj.channels = 64
    tensor = torch.arange(3.0)
    patches = {"object": obj, "plain": _guidance_patch(2.0, tensor), "cycle": _guidance_patch(-1.0, tensor),
               "lambda": lambda x, k=3, *, j=4: x * k + j}
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(patches["plain"])
    back = pickle.loads(refs.dumps(patches))
    args = {"denoised": torch.tensor([1.0, 2.0])}
    for name in ("plain", "cycle"):
        assert torch.equal(back[name](args), patches[name](args)), name
    assert back["object"].reshape(2) == 128 and back["lambda"](2) == 10 and back["lambda"].__qualname__.endswith("<lambda>")
    (tmp_path / "patches.pkl").write_bytes(refs.dumps(patches))
    code = textwrap.dedent(f"""
        import pickle, sys, torch
        sys.path.insert(0, {ROOT!r})
        patches = pickle.load(open({str(tmp_path / "patches.pkl")!r}, "rb"))
        print(patches["cycle"]({{"denoised": torch.tensor([1.0, 2.0])}}).tolist(), patches["object"].reshape(1))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{patches['cycle'](args).tolist()} 64"


class _ModelPatcherLike:
    """What `refs` takes for a ComfyUI ModelPatcher (duck-typed): weights that must not ride along."""

    def __init__(self):
        self.model, self.patches, self.model_options = torch.nn.Linear(2, 2), {}, {}


def _closure_over(value):
    def uses(x):
        return value, x

    return uses


def test_what_travels_by_value_keeps_its_meaning():
    """Found in review: a wrapper whose functools.wraps copied a local function's names runs
    with its own module's globals; a module-level lambda renamed by functools.wraps travels
    as itself, not as the function whose name it took; a local dict or list subclass keeps
    its items; a closure over a model, or a function of no importable module (a script's
    __main__), is refused instead of sending weights with every job or re-running the script."""
    import functools

    inner = _guidance_patch(1.0, torch.zeros(1))

    @functools.wraps(inner)
    def wrapper(args):
        return inner(args) + _module_level_helper()

    renamed = functools.wraps(_module_level_helper)(lambda: 41.0)
    back = pickle.loads(refs.dumps({"wrapper": wrapper, "renamed": renamed}))
    args = {"denoised": torch.tensor([1.0])}
    assert torch.equal(back["wrapper"](args), wrapper(args)) and back["renamed"]() == 41.0

    def local_containers():
        class Items(dict):
            pass

        class Rows(list):
            pass

        items, rows = Items(a=1), Rows([1, 2, 3])
        items.extra = 2
        return items, rows

    items, rows = pickle.loads(refs.dumps(local_containers()))
    assert dict(items) == {"a": 1} and items.extra == 2 and list(rows) == [1, 2, 3]
    with pytest.raises(pickle.PicklingError, match="holds a model"):
        refs.dumps(_closure_over(_ModelPatcherLike()))
    scripted = {}
    exec("def f(x):\n    return x\n", {"__name__": "__main__"}, scripted)
    with pytest.raises(pickle.PicklingError, match="not those of an importable module"):
        refs.dumps(scripted["f"])


def test_a_module_that_cannot_load_elsewhere_is_named(tmp_path):
    """A custom node pack whose package needs ComfyUI's server at import (its routes): the
    process that receives one of its closures says which module failed to load, and why."""
    pack = tmp_path / "server.pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("NO_SERVER"):  # as `PromptServer.instance.routes` outside ComfyUI's process
            raise AttributeError("type object 'PromptServer' has no attribute 'instance'")
        from .nodes import patch
    """))
    (pack / "nodes.py").write_text(textwrap.dedent("""
        def patch(scale):
            def post_cfg(args):
                return args * scale
            return post_cfg
    """))
    closure = _load_like_comfyui(str(pack)).patch(2.0)
    assert pickle.loads(refs.dumps(closure))(3) == 6
    script = textwrap.dedent(f"""
        import os, pickle, sys
        sys.path.insert(0, {ROOT!r})
        os.environ["NO_SERVER"] = "1"
        data = sys.stdin.buffer.read()
        for attempt in range(2):  # a worker gets the next job's closure too: it fails the same way
            try:
                pickle.loads(data)
                print("loaded")
            except ImportError as exc:
                print("failed:", exc)
    """)
    done = subprocess.run([sys.executable, "-c", script], input=refs.dumps(closure), capture_output=True, timeout=120)
    lines = done.stdout.decode().splitlines()
    assert done.returncode == 0 and len(lines) == 2, done.stderr.decode()[-2000:]
    assert all(line.startswith("failed:") and "could not load" in line and "PromptServer" in line for line in lines), lines
