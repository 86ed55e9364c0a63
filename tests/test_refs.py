"""Unit tier: objects of modules that ComfyUI names by their file path (comfy_extras, custom
node packs) pickled for another process, which cannot import them by that name."""
import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap

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
    """A module of a class defined in a function is sent as a PortableModule (rebuilt from its
    bases and state) only when it does not pickle by itself: a torch.fx GraphModule's class is
    local too and pickles with its code (as a PortableModule it lost its forward)."""
    import torch
    import torch.fx

    from comfy_para_attn.adapters.comfy.portable import PortableModule, portable_object_patches

    def local_module():
        class Shifted(torch.nn.Module):
            def forward(self, x):
                return x + 1

        return Shifted()

    traced = torch.fx.symbolic_trace(local_module())
    sent = pickle.loads(pickle.dumps(portable_object_patches({"traced": traced, "local": local_module()})))
    assert not isinstance(sent["traced"], PortableModule)
    x = torch.randn(3)
    assert torch.equal(sent["traced"](x), x + 1)
    assert isinstance(sent["local"], PortableModule)


def test_a_local_class_of_a_path_named_module_travels_as_a_portable_module(tmp_path):
    """ComfyUI's ModelSampling nodes patch in an instance of a class made inside the node's
    function, in a module named by its path (comfy_extras): no name reaches that class, so it
    travels as a PortableModule whose base class goes by file (it was sent as a reference to
    "patch.<locals>.Advanced", which no worker could resolve: every multi-GPU HunyuanVideo and
    Wan workflow failed)."""
    from comfy_para_attn.adapters.comfy.portable import PortableModule, portable_object_patches

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
        try:
            refs.dumps(patched)
            raise AssertionError("a class defined in a function was pickled by name")
        except (pickle.PicklingError, AttributeError):
            pass
        sent = portable_object_patches({"model_sampling": patched})
        assert isinstance(sent["model_sampling"], PortableModule)
        script = textwrap.dedent(f"""
            import pickle, sys, torch
            sys.path.insert(0, {ROOT!r})
            module = pickle.loads(sys.stdin.buffer.read())["model_sampling"].rebuild()
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
