"""FP8 test helpers: bf16 activations and torchao dynamic fp8 linear layers for the kernel
tests (on CUDA, or on CPU through Triton's interpreter), and FP8 Quantize on a CUDA ComfyUI
(gpu tier), run in a spawned process, since the comfyui tier's own process imports ComfyUI
with `--cpu`."""
from __future__ import annotations

import importlib.util

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_unavailable_reason() -> str | None:
    """Why the fp8 Triton kernels cannot run in this process (None: they can)."""
    from comfy_para_attn.kernels._runtime import interpreter_unusable_reason, interpreting

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if DEVICE == "cpu" and (not interpreting() or interpreter_unusable_reason()):
        return "no CUDA, and Triton's interpreter is not usable in this process"
    return None


def activations(rows, cols, seed=0):
    """bf16 [rows, cols] with rows of different magnitude, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 4 + 0.1
    return (torch.randn(rows, cols, generator=g) * scale).to(torch.bfloat16).to(DEVICE)


def make_dynamic_fp8(linear: torch.nn.Linear) -> torch.nn.Linear:
    """`linear` with its weight replaced by torchao's dynamic row-wise fp8 tensor, made
    directly (torchao's quantize_ refuses CPUs; its matmul runs there)."""
    from torchao.float8.inference import Float8MMConfig
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows import Float8Tensor, QuantizeTensorToFloat8Kwargs

    weight = Float8Tensor.from_hp(linear.weight.detach(), granularity=PerRow(),
                                  mm_config=Float8MMConfig(use_fast_accum=True),
                                  act_quant_kwargs=QuantizeTensorToFloat8Kwargs(granularity=PerRow()))
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    return linear


def dynamic_fp8_linear(in_features, out_features, seed=1) -> torch.nn.Linear:
    """A new bf16 linear layer on DEVICE with a dynamic row-wise fp8 weight."""
    torch.manual_seed(seed)
    return make_dynamic_fp8(torch.nn.Linear(in_features, out_features).to(torch.bfloat16).to(DEVICE))


def make_fused_layers_fp8(diffusion_model) -> None:
    """Dynamic fp8 weights on every fused layer of a ComfyUI diffusion model (GELU sites,
    norm-fed layers, attention outputs), then the fusion's patches, as FP8 Quantize leaves
    them on a GPU."""
    from comfy_para_attn.quant import gelu_fusion

    sites = gelu_fusion.all_sites(diffusion_model)
    for site in sites:
        make_dynamic_fp8(gelu_fusion.module_at(diffusion_model, site.linear))
    gelu_fusion.apply_patches(diffusion_model, gelu_fusion.patches(diffusion_model, sites))


def folding_backend(folds, graphs=None):
    """A torch.compile backend that runs `folds` (a `GraphFolds`) on dynamo's graph, then runs
    the graph as it is (collected in `graphs` if given)."""
    def backend(gm, example_inputs):
        folds(gm.graph)
        gm.recompile()
        if graphs is not None:
            graphs.append(gm)
        return gm.forward

    return backend


def compiled_with_folds(module, *inputs):
    """(output, the folds' counts, call_function targets) of `module` compiled whole through
    `folding_backend`."""
    from comfy_para_attn.graph_folds import GraphFolds

    folds, graphs = GraphFolds(), []
    torch._dynamo.reset()
    out = torch.compile(module, backend=folding_backend(folds, graphs), fullgraph=True)(*inputs)
    return out, folds.counts, [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]


def fp8_round_trip_on_cuda(rank, world_size, comfy_path, cpu=False):
    """A tiny bf16 Flux that loads from the host to the GPU, and its plain twin. FP8, plain,
    FP8 again: the FP8 loads back up the host tensors the weights came from (no copies back
    from the GPU), the plain clone gets the exact weights and output back. Then the twin runs
    plain first, so its FP8 load has no host tensors held and copies; same output."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=cpu)  # cpu=True: a smoke run of the same steps on CPU
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension

    from comfy_para_attn.adapters.comfy import fp8, fp8_originals
    from comfy_para_attn.quant.gelu_fusion import GeluThenLinear
    from comfy_para_attn.quant import FP8Settings
    from comfy_para_attn.testing import comfy_models as cm

    def patcher():
        built = cm.build("flux", dtype=torch.bfloat16, device="cpu", seed=0, **cm.flux_config("tiny"))
        return comfy.model_patcher.ModelPatcher(built.model, load_device=comfy.model_management.get_torch_device(),
                                                offload_device=torch.device("cpu"))

    plain, twin = patcher(), patcher()
    before = {k: v.clone() for k, v in plain.model.diffusion_model.state_dict().items()}
    positive = cm.conditioning(plain, seed=1)
    latent = torch.zeros(cm.latent_shape("flux"))
    loads = []

    def fused_sites(patcher):
        return sum(isinstance(m, GeluThenLinear) for m in patcher.model.diffusion_model.modules())

    def look(patcher, *args):
        held = fp8_originals._host_originals.get(patcher.model, {})
        loads.append({"held_backups": sum(patcher.backup[k].weight is t for k, t in held.items()),
                      "fused_layers": fused_sites(patcher),
                      "device": str(next(iter(patcher.model.diffusion_model.parameters())).device)})

    def quantize(base):
        model = fp8.apply_fp8(base, FP8Settings())
        model.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, look)
        return model

    def run(model):
        return cm.sample(model, positive, [], latent, steps=3, cfg=1.0, seed=0)

    model = quantize(plain)
    quantized = run(model)
    restored = run(plain)
    fused_after_restore = fused_sites(plain)
    quantized_again = run(model)
    reference = run(twin)
    twin_quantized = run(quantize(twin))
    comfy.model_management.unload_all_models()
    same = all(torch.equal(before[k], m.model.diffusion_model.state_dict()[k].cpu()) for m in (plain, twin)
               for k in before)
    return {"loads": loads, "fused_after_restore": fused_after_restore, "same_weights": same, "same_output": bool(torch.equal(restored, reference)),
            "fp8_repeats": bool(torch.equal(quantized, quantized_again) and torch.equal(quantized, twin_quantized)),
            "fp8_differs": float((quantized - reference).abs().mean() / reference.abs().mean()),
            "finite": bool(torch.isfinite(quantized).all())}


def folds_against_eager_on_cuda(rank, world_size, comfy_path):
    """{(family, folds on): {"counts", "rel", "finite"}}: tiny ComfyUI FLUX / HunyuanVideo with
    dynamic fp8 on the fused layers, sampled eager, then with the blocks compiled by inductor
    with our graph pass folding everything or nothing (inductor's FX graph cache off, so the
    second compile is not the first one's graph); "rel" is the compiled latent's relative
    distance from eager."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=False)
    import comfy.model_patcher

    from comfy_para_attn import graph_folds
    from comfy_para_attn.compile import CompileSettings, inductor_options
    from comfy_para_attn.testing import comfy_models as cm

    torch._inductor.config.fx_graph_cache = False
    every_fold, results = dict(graph_folds.FOLDS), {}
    try:
        for family in ("flux", "hunyuan_video"):
            for folds_on in (True, False):
                graph_folds.FOLDS.clear()
                graph_folds.FOLDS.update(every_fold if folds_on else {})
                built = cm.build(family, dtype=torch.bfloat16, seed=0, **(cm.flux_config("tiny") if family == "flux" else {}))
                patcher = comfy.model_patcher.ModelPatcher(built.model, load_device=torch.device("cuda"),
                                                           offload_device=torch.device("cpu"))
                dm = patcher.model.diffusion_model.cuda()
                make_fused_layers_fp8(dm)
                positive = cm.conditioning(patcher, seed=1)
                latent = torch.randn(cm.latent_shape(family), generator=torch.Generator().manual_seed(3))
                eager = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)
                folds = inductor_options()["pre_grad_custom_pass"]
                before = dict(folds.counts)
                torch._dynamo.reset()
                for block in list(dm.double_blocks) + list(dm.single_blocks):
                    block.compile(**CompileSettings().compile_kwargs())
                out = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)
                results[family, folds_on] = {
                    "counts": {k: folds.counts[k] - before.get(k, 0) for k in ("cat", "layer norm", "rope", "rope pairs")},
                    "rel": float((out.float() - eager.float()).norm() / eager.float().norm()),
                    "finite": bool(torch.isfinite(out).all())}
    finally:
        graph_folds.FOLDS.clear()
        graph_folds.FOLDS.update(every_fold)
    return results


def dequantized_state_dict(checkpoint: dict) -> dict:
    """The fp32 weights an fp8_scaled checkpoint stands for (fp8 x scale, exactly)."""
    out = {}
    for key, value in checkpoint.items():
        if key.endswith((".scale_weight", ".scale_input")) or key == "scaled_fp8":
            continue
        scale = checkpoint.get(key.removesuffix("weight") + "scale_weight") if key.endswith(".weight") else None
        out[key] = value.float() * scale if scale is not None else value.float()
    return out


def stored_fp8_layers(patcher) -> dict:
    """{name: layer} of the diffusion model's linear layers whose weight is stored in fp8."""
    return {n: m for n, m in patcher.model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float8_e4m3fn}


def kept_stored_fp8(patcher, names) -> int:
    """How many of the layers `names` hold a quantized weight whose fp8 values are the bytes
    of the stored weight ComfyUI backed up and whose scales all equal its scale_weight (or 1)."""
    from comfy_para_attn.quant import is_quantized

    kept = 0
    for name in names:
        layer = patcher.model.diffusion_model.get_submodule(name)
        backup = patcher.backup.get(f"diffusion_model.{name}.weight")
        if backup is None:  # left as it was
            continue
        stored = backup.weight
        scale = getattr(layer, "scale_weight", None)
        scale = torch.ones(()) if scale is None else scale.detach().float().cpu()
        weight = layer.weight
        kept += bool(is_quantized(weight) and torch.equal(weight.qdata.cpu().view(torch.uint8), stored.cpu().view(torch.uint8))
                     and torch.equal(weight.scale.cpu(), scale.expand_as(weight.scale.cpu())))
    return kept


def stored_fp8_on_cuda(rank, world_size, comfy_path):
    """{family: results}: tiny Wan 2.1 (ComfyUI computes it in fp16: tensor-wise fp8) and FLUX
    (bf16: row-wise, fused GELUs) loaded from fp8_scaled state dicts on CUDA, each sampled by
    ComfyUI as it is (the marker keeps ComfyUI's own fp8 matmuls off: it computes with the
    dequantized weights), with FP8 Quantize (fp8 tensor-core matmuls) and with FP8 Quantize +
    Compile Model; the reference is the fp32 model of the dequantized weights."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=False)
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.sd

    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.fp8 import apply_fp8
    from comfy_para_attn.adapters.comfy.patches import compute_dtype
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.quant import FP8Settings, quantizable_linears
    from comfy_para_attn.testing import comfy_models as cm, tiny_files

    results = {}
    for family in ("wan", "flux"):
        state = tiny_files.random_state_dict(tiny_files.shapes_of(family), seed=0)
        checkpoint = tiny_files.fp8_scaled_state_dict(state, comfy_fp8_matmuls=False)
        model = comfy.sd.load_diffusion_model_state_dict(dict(checkpoint))
        reference = comfy.sd.load_diffusion_model_state_dict(dequantized_state_dict(checkpoint),
                                                             model_options={"dtype": torch.float32})
        classes = {n: type(m) for n, m in stored_fp8_layers(model).items()}
        names = sorted(set(stored_fp8_layers(model)) & {n for n, _ in quantizable_linears(
            model.model.diffusion_model, FP8Settings().patterns)})
        positive = cm.conditioning(model, seed=1)
        latent = torch.randn(cm.latent_shape(family), generator=torch.Generator().manual_seed(2))
        seen = {}

        def run(patcher):
            with torch.inference_mode():
                return cm.sample(patcher, positive, [], latent, steps=3, cfg=1.0, seed=0, denoise=0.7).float()

        quantized = apply_fp8(model, FP8Settings())
        quantized.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD,
                               lambda p, *a: seen.setdefault("kept", kept_stored_fp8(p, names)))
        outputs = {"reference": run(reference), "comfy": run(model),
                   "comfy compiled": run(apply_compile(model, CompileSettings())), "ours": run(quantized),
                   "ours compiled": run(apply_compile(quantized, CompileSettings()))}
        outputs["comfy again"] = run(model)
        layers = stored_fp8_layers(model)
        restored = {n: type(m) for n, m in layers.items()} == classes  # ComfyUI's own classes again
        comfy.model_management.unload_all_models()
        ref = outputs["reference"]
        results[family] = {
            "compute_dtype": str(compute_dtype(model.model)),
            "layers": len(names), "kept": seen.get("kept"), "restored": restored,
            "finite": all(bool(torch.isfinite(o).all()) for o in outputs.values()),
            "comfy_repeats": bool(torch.equal(outputs["comfy"], outputs["comfy again"])),
            "rel": {k: float((o - ref).norm() / ref.norm()) for k, o in outputs.items() if k != "reference"},
            "rel_to_comfy": {k: float((outputs[k] - outputs["comfy"]).norm() / outputs["comfy"].norm())
                             for k in ("comfy compiled", "ours", "ours compiled")},
            "compiled_vs_eager": float((outputs["ours compiled"] - outputs["ours"]).norm() / outputs["ours"].norm())}
    return results


def short_prompt_fp8_on_cuda(rank, world_size, comfy_path):
    """HunyuanVideo's block width (3072, MLP 12288; two double and two single blocks) with a
    short prompt: ComfyUI does not pad its 20 text tokens, so a text MLP output layer multiplies
    20 rows over 12288 columns, where cuBLASLt has no row-wise fp8 GEMM with a bias. bf16, and
    FP8 Quantize (row-wise, fused classes) eager and under Compile Model, on CUDA."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=False)
    import comfy.model_management

    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.fp8 import apply_fp8
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.quant import FP8Settings
    from comfy_para_attn.testing import comfy_models as cm

    config = dict(hidden_size=3072, num_heads=24, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56])
    model = cm.build("hunyuan_video", dtype=torch.bfloat16, device=comfy.model_management.get_torch_device(), **config)
    positive = cm.conditioning(model, tokens=20, seed=1)
    latent = torch.randn(cm.latent_shape("hunyuan_video", frames=3, height=8, width=12),
                         generator=torch.Generator().manual_seed(2))

    def run(patcher):
        with torch.inference_mode():
            return cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0, seed=0, denoise=0.7).float()

    plain = run(model)
    fp8 = apply_fp8(model, FP8Settings())
    outputs = {"eager": run(fp8), "compiled": run(apply_compile(fp8, CompileSettings()))}
    comfy.model_management.unload_all_models()
    return {"finite": all(bool(torch.isfinite(o).all()) for o in outputs.values()),
            "rel": {k: float((o - plain).norm() / plain.norm()) for k, o in outputs.items()}}
