"""cuDNN's own fp8 attention forward, as a baseline for our quantized Triton kernel (not a backend
of the pack): what NVIDIA's library reaches on this GPU, and how accurate e4m3 Q.K^T is.

Needs the optional `nvidia-cudnn-frontend` package (`pip install nvidia-cudnn-frontend`; 1.14
ran against the cuDNN 9.19 that torch 2.11+cu130 ships). Per-tensor scales: Q, K (mean key
removed first, which leaves the softmax unchanged) and V are cast to e4m3 from their absolute
maxima; P is quantized by cuDNN with scale 448; O comes back in e4m3 (Hopper's fp8 forward
refused a bf16 O here) and is dequantized. Two entries:
  cudnn-fp8         the whole call from bf16 to bf16 (quantization by plain torch ops);
  cudnn-fp8-kernel  the cuDNN call alone on inputs quantized once (what fused quantization
                    could approach).
"""
from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def _import_cudnn():
    # torch loads its own libcudnn on first use; the frontend then finds that same library
    torch.backends.cudnn.is_available()
    import cudnn

    return cudnn


class CudnnFp8Attention:
    """One cuDNN graph per (shape, stride); call(q, k, v, bias, _) -> (out bf16, lse fp32)."""

    def __init__(self, kernel_only: bool = False):
        self.cudnn = _import_cudnn()
        self.handle = self.cudnn.create_handle()
        self.kernel_only = kernel_only
        self.graphs: dict = {}
        self.prepared: dict = {}

    def _graph(self, shape, stride):
        key = (tuple(shape), tuple(stride))
        if key not in self.graphs:
            self.graphs[key] = self._build(shape, stride)
        return self.graphs[key]

    def _build(self, shape, stride):
        cudnn = self.cudnn
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)
        q, k, v = [graph.tensor(name=n, dim=list(shape), stride=list(stride), data_type=e4m3) for n in "qkv"]
        scalars = [graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
                   for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        out, stats, amax_s, amax_o = graph.sdpa_fp8(
            q=q, k=k, v=v, descale_q=scalars[0], descale_k=scalars[1], descale_v=scalars[2],
            descale_s=scalars[3], scale_s=scalars[4], scale_o=scalars[5], is_inference=False,
            attn_scale=1.0 / math.sqrt(shape[-1]), use_causal_mask=False, name="sdpa_fp8")
        batch, heads, seq, _ = shape
        out.set_output(True).set_dim(list(shape)).set_stride(list(stride)).set_data_type(e4m3)
        stats.set_output(True).set_dim([batch, heads, seq, 1]).set_stride([heads * seq, seq, 1, 1]).set_data_type(fp32)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        workspace = torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device="cuda")
        return graph, (q, k, v, *scalars, out, stats, amax_s, amax_o), workspace

    @staticmethod
    def _quantize(x):
        scale = E4M3_MAX / x.abs().amax().float().clamp_min(1e-12)
        return (x.float() * scale).to(E4M3), (1.0 / scale).reshape(1, 1, 1, 1)

    def _prepare(self, q, k, v):
        key_mean = k.float().mean(dim=2, keepdim=True)
        # removing the mean key shifts every score of a row by q . mean: softmax unchanged, lse shifted back below
        lse_shift = (q.float() @ key_mean.transpose(-1, -2)).squeeze(-1) / math.sqrt(q.shape[-1])
        (q8, dq), (k8, dk), (v8, dv) = self._quantize(q), self._quantize(k.float() - key_mean), self._quantize(v)
        scale_o = E4M3_MAX / v.abs().amax().float().clamp_min(1e-12)  # |O| <= max |V|
        return q8, k8, v8, dq, dk, dv, scale_o.reshape(1, 1, 1, 1), lse_shift

    def __call__(self, q, k, v, bias=None, _scale=None):
        if bias is not None:
            raise NotImplementedError("no key mask in this baseline")
        key = tuple((t.data_ptr(), tuple(t.shape), t.stride()) for t in (q, k, v))  # (a freed shape's address may return)
        if self.kernel_only and key in self.prepared:
            prepared = self.prepared[key]
        else:
            prepared = self._prepare(q, k, v)
            if self.kernel_only:
                self.prepared = {key: prepared}
        q8, k8, v8, dq, dk, dv, scale_o, lse_shift = prepared
        graph, tensors, workspace = self._graph(q8.shape, q8.stride())
        tq, tk, tv, tdq, tdk, tdv, tds, tss, tso, tout, tstats, tamax_s, tamax_o = tensors
        out = torch.empty_like(q8)
        stats = torch.empty(*q.shape[:3], 1, dtype=torch.float32, device=q.device)
        scale_s = torch.full((1, 1, 1, 1), E4M3_MAX, device=q.device)
        amax = torch.empty(2, 1, 1, 1, 1, device=q.device)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)
        graph.execute({tq: q8, tk: k8, tv: v8, tdq: dq, tdk: dk, tdv: dv, tds: 1.0 / scale_s, tss: scale_s,
                       tso: scale_o, tout: out, tstats: stats, tamax_s: amax[0], tamax_o: amax[1]},
                      workspace, handle=self.handle)
        if self.kernel_only:
            return out, stats
        return (out.float() / scale_o).to(q.dtype), stats.squeeze(-1) + lse_shift


def baselines() -> dict:
    """The two entries, or {} with the reason printed when the frontend is not installed."""
    try:
        return {"cudnn-fp8": CudnnFp8Attention(), "cudnn-fp8-kernel": CudnnFp8Attention(kernel_only=True)}
    except Exception as exc:  # ImportError, or a cuDNN without the fp8 graph
        print(f"cudnn-fp8 baseline skipped: {type(exc).__name__}: {exc}")
        return {}
