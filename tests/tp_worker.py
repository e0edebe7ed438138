"""One rank of the tensor-parallel tests (tests/test_parallel.py starts it under torchrun, gloo on the CPU).

argv: a JSON file listing cases {"path", "chai" (ChaiConfig json or null), "tokens" [B, S], "prefill", "out"}. For
each case the rank loads its slices (parallel.load), scores the tokens uncached, then prefills `prefill` tokens and
decodes the rest one at a time through the cache, and saves the logits, the bytes read and its memory to out.rank.pt.
"""
import json
import sys

import torch

import chai_models.chai  # noqa: F401  (imported before the byte counts, so that no module file read counts)
import chai_models.fast  # noqa: F401
from chai_models import ChaiConfig, parallel


@torch.no_grad()
def run_case(case, tp):
    chai = None if case["chai"] is None else ChaiConfig.from_json(case["chai"])
    before = parallel.host_memory()
    model = parallel.load(case["path"], device="cpu", chai=chai, backend="torch")
    after_load = parallel.host_memory()
    local_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    tokens = torch.tensor(case["tokens"])
    B, S = tokens.shape
    full = model(tokens)  # [B, S, vocab], no cache
    P = case["prefill"]
    model.setup_caches(B, S)
    steps = [model(tokens[:, :P], torch.arange(P))[:, -1]]
    for p in range(P, S):
        steps.append(model(tokens[:, p:p + 1], torch.tensor([p]))[:, -1])
    torch.save({"full": full, "cached": torch.stack(steps, 1), "bytes_read": model.bytes_read,
                "rchar": after_load["rchar"] - before["rchar"], "local_bytes": local_bytes,
                "rss": parallel.host_memory()["rss"], "n_heads": [a.n_heads for a in model.attention_layers],
                "n_clusters": [getattr(a, "n_clusters", None) for a in model.attention_layers]},
               f"{case['out']}.{tp.rank}.pt")


def main():
    tp, _ = parallel.init_from_env("cpu")
    for case in json.loads(open(sys.argv[1]).read()):
        run_case(case, tp)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
