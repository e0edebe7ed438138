"""Generation and the command line on an OPT checkpoint: a tiny random transformers OPTForCausalLM with a
GPT-2-style vocab.json + merges.txt (a byte-level BPE trained here with `tokenizers`), converted with
chai_models.convert; our greedy tokens must equal transformers' own greedy generate."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from chai_models import ChaiConfig, generate, load, load_tokenizer  # noqa: E402
from chai_models.convert import convert  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
N_NEW = 24
PROMPTS = ["hello", "The quick brown fox", "def main():\n    return"]
# HF's OPT tokenizer is a GPT2Tokenizer with bos = eos = unk = '</s>' (id 2), pad '<pad>' (id 1)
OPT_TOKENIZER = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}


def train_bpe(folder: Path) -> int:
    """vocab.json + merges.txt of a small byte-level BPE trained on Python's documentation text; its size."""
    from tokenizers import ByteLevelBPETokenizer

    from chai_models.calibration import default_texts

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(default_texts()[:3000], vocab_size=600, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.save_model(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps(OPT_TOKENIZER))
    return bpe.get_vocab_size()


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    """(hf model, source folder, converted folder): 2 layers of 4 heads, random weights, fp32."""
    root = tmp_path_factory.mktemp("opt-gen")
    src = root / "hf"
    src.mkdir()
    vocab = train_bpe(src)
    cfg = transformers.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=160, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=128, pad_token_id=1,
                                 bos_token_id=2, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.OPTForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():  # larger than HF's init (std 0.02) so the logits are far from ties
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "layer_norm" not in name:
                p.copy_(0.1 * torch.randn_like(p))
    hf.eval()
    hf.save_pretrained(src)
    dst = convert(src, root / "ours")
    return hf, src, dst


def test_tokenizer_files_travel_with_conversion(opt):
    _, _, dst = opt
    assert (dst / "vocab.json").exists() and (dst / "merges.txt").exists()
    tok = load_tokenizer(dst)
    assert tok.bos_id == 2 and 2 in tok.eos_ids and tok.encode("hello")[0] == 2  # OPT: '</s>' in front


def test_greedy_generation_matches_transformers(opt):
    hf, _, dst = opt
    model, tok = load(dst, dtype="float32"), load_tokenizer(dst)
    assert model.family == "opt"
    # eos off on both sides, so both run the full length whatever the random model emits
    ours = generate(model, tok, PROMPTS, max_new_tokens=N_NEW, eos_ids=[])
    assert ours.finish_reasons == ["length"] * len(PROMPTS)
    for prompt, got in zip(PROMPTS, ours.tokens):
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                              eos_token_id=None, pad_token_id=1)
        ref = ref[0, ids.shape[1]:].tolist()
        assert len(ref) == N_NEW and got == ref, (prompt, got, ref)
    # one prompt alone gives the same tokens as inside the batch (rows of different lengths share steps)
    alone = generate(model, tok, PROMPTS[1], max_new_tokens=N_NEW, eos_ids=[])
    assert alone.tokens[0] == ours.tokens[1]


def test_greedy_generation_with_chai_runs(opt):
    _, _, dst = opt
    model, tok = load(dst, dtype="float32", chai=ChaiConfig([2, 2])), load_tokenizer(dst)
    out = generate(model, tok, PROMPTS, max_new_tokens=N_NEW, eos_ids=[])
    assert [len(t) for t in out.tokens] == [N_NEW] * len(PROMPTS)
    b = model.kv_cache_bytes()
    assert b["k"] * 2 == b["v"]  # OPT is MHA: 2 of 4 K heads kept in every layer


def cli(dst, *extra):
    cmd = [sys.executable, "-m", "chai_models", "generate", "hello", "--model", str(dst), "--raw",
           "--max-new-tokens", "8", "--device", "cpu", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)  # a hang guard


def test_cli_generate_on_opt(opt):
    _, _, dst = opt
    run = cli(dst)
    assert run.returncode == 0, run.stderr
    assert "prompt tokens" in run.stderr and "generated" in run.stderr and "tok/s" in run.stderr, run.stderr
    assert "CHAI" not in run.stderr  # dense: no CHAI summary
    assert load(dst).config.n_heads > 2
    run = cli(dst, "--chai", "2")
    assert run.returncode == 0, run.stderr
    assert "prompt tokens" in run.stderr and "CHAI clusters per layer: 2x2 (of 4 heads;" in run.stderr, run.stderr
    assert "no K dropped" not in run.stderr, run.stderr  # 2 clusters of 4 KV heads drop K
