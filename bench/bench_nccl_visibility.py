"""Does giving each worker only its own GPU (CUDA_VISIBLE_DEVICES=<one>) cost NCCL its
NVLink P2P path? Times a 28 MiB all_to_all_single between 2 processes started with
  isolated:  CUDA_VISIBLE_DEVICES=0 / =1
  reordered: CUDA_VISIBLE_DEVICES=0,1 / =1,0   (own GPU first, peers still visible)
and prints GB/s per rank and the NCCL transport it chose.

    python bench/bench_nccl_visibility.py
"""
import os
import re
import socket
import subprocess
import sys
import time


def child():
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", 0))
    x = torch.randn(28 * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(x)
    for _ in range(5):
        dist.all_to_all_single(out, x)
    torch.cuda.synchronize()
    n = 50
    began = time.perf_counter()
    for _ in range(n):
        dist.all_to_all_single(out, x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / n
    if rank == 0:
        # each rank sends half its buffer to its peer
        print(f"RESULT {seconds * 1e3:.3f} ms per 28 MiB all_to_all, {x.numel() * 2 / 2 / seconds / 1e9:.1f} GB/s to peer")
    dist.destroy_process_group()


def main():
    for mode, visible in (("isolated", ("0", "1")), ("reordered", ("0,1", "1,0"))):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       CUDA_VISIBLE_DEVICES=visible[rank], NCCL_DEBUG="INFO", BENCH_CHILD="1")
            procs.append(subprocess.Popen([sys.executable, __file__], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        transports = sorted(set(re.findall(r"via (P2P/\S+|SHM/\S+|NET/\S+|P2P|SHM)", outputs[0])))
        result = [line for line in outputs[0].splitlines() if line.startswith("RESULT")]
        print(f"{mode:10s} {result[0] if result else outputs[0][-2000:]} | transports {transports}")


if __name__ == "__main__":
    child() if os.environ.get("BENCH_CHILD") else main()
