"""One rank of the tensor-parallel tests (tests/test_parallel.py starts it under torchrun, gloo on the CPU).

argv: a JSON file listing cases {"path", "chai" (ChaiConfig json or null), "tokens" [B, S], "prefill", "out", and
optionally "device" (cpu; cuda: this rank's GPU, NCCL), "backend" (torch), "compile" (false: the compiled CUDA-graph
decode step)}. For each case the rank loads its slices (parallel.load), scores the tokens uncached, then prefills
`prefill` tokens and decodes the rest one at a time through the cache, and saves the logits, the bytes read and its
memory to out.rank.pt.
"""
import json
import sys

import torch

# every module parallel.load imports is imported here, before the byte counts, so that no module file read counts
from chai_models import ChaiConfig, parallel
from chai_models.fast.compile import decode_step


@torch.no_grad()
def run_case(case, tp, device):
    chai = None if case["chai"] is None else ChaiConfig.from_json(case["chai"])
    before = parallel.host_memory()
    model = parallel.load(case["path"], device=device, chai=chai, backend=case.get("backend", "torch"))
    after_load = parallel.host_memory()
    local_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tokens = torch.tensor(case["tokens"], device=device)
    B, S = tokens.shape
    full = model(tokens)  # [B, S, vocab], no cache
    P = case["prefill"]
    model.setup_caches(B, S)
    steps = [model(tokens[:, :P], torch.arange(P, device=device))[:, -1]]
    step = decode_step(model, case.get("compile", False))
    pos = torch.zeros(1, dtype=torch.long, device=device)
    for p in range(P, S):
        pos.fill_(p)
        steps.append(step(tokens[:, p:p + 1], pos))
    full, cached = full.cpu(), torch.stack(steps, 1).cpu()
    torch.save({"full": full, "cached": cached, "bytes_read": model.bytes_read,
                "rchar": after_load["rchar"] - before["rchar"], "local_bytes": local_bytes,
                "rss": parallel.host_memory()["rss"], "n_heads": [a.n_heads for a in model.attention_layers],
                "n_clusters": [getattr(a, "n_clusters", None) for a in model.attention_layers]},
               f"{case['out']}.{tp.rank}.pt")


def main():
    cases = json.loads(open(sys.argv[1]).read())
    tp, device = parallel.init_from_env(cases[0].get("device", "cpu"))
    for case in cases:
        run_case(case, tp, device)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
