"""Compiles every Triton kernel of chai_models.kernels for sm90 (H100/H200) without a GPU, in the variants the
launchers use. Exit status 1 and the compiler's message on the first failure. Used by tests/test_decode_kernel.py.

    python tests/compile_kernels.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from chai_models import kernels as k  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
BF16, I32 = "*bf16", "i32"


def compile_one(fn, signature: dict, constexprs: dict):
    sig = {name: ("constexpr" if name in constexprs else kind) for name, kind in signature.items()}
    triton.compile(ASTSource(fn, sig, constexprs), target=HOPPER)


def main():
    split = dict(q_ptr=BF16, k_ptr=BF16, v_ptr=BF16, kn_ptr=BF16, vn_ptr=BF16, cos_ptr=BF16, sin_ptr=BF16,
                 members_ptr="*i64", start_ptr="*i64", slot_ptr="*i64",
                 pos_ptr="*i64", acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", count_ptr="*i32", out_ptr=BF16,
                 **{n: I32 for n in ("sq_b", "sq_c", "sk_b", "sk_s", "sk_t", "sv_b", "sv_h", "sv_t", "skn_b", "skn_s",
                                     "svn_b", "svn_h", "so_b", "so_h")},
                 qk_scale="fp32", SPLIT=I32, N_SPLITS=I32, N_CHUNKS=I32,
                 **{n: None for n in ("H", "K", "G", "D", "N_SLOTS", "HKV", "HPB", "BLOCK_T", "BLOCK_D", "BLOCK_K",
                                      "BLOCK_S", "ONE_SPLIT", "STAGES", "DENSE", "NEW", "ROPE", "FUSED_COMBINE",
                                      "PDL")})
    for dense, one_split, fused, pdl, new, rope in ((True, False, True, True, True, True),
                                                    (True, False, True, True, False, False),
                                                    (False, False, True, True, True, True),
                                                    (False, False, False, False, True, False),
                                                    (False, False, False, True, False, False),
                                                    (False, True, False, True, True, True)):
        compile_one(k._decode_split_kernel, split,
                    dict(H=32, K=32 if dense else 4, G=2, D=128, N_SLOTS=16 if dense else 4, HKV=16,
                         HPB=1 if dense else 8, BLOCK_T=64 if dense else 32, BLOCK_D=128, BLOCK_K=32 if dense else 4,
                         BLOCK_S=8, ONE_SPLIT=one_split, STAGES=2, DENSE=dense, NEW=new, ROPE=rope,
                         FUSED_COMBINE=fused, PDL=pdl))
    compile_one(k._decode_combine_kernel,
                dict(acc_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", pos_ptr="*i64", out_ptr=BF16, so_b=I32, so_h=I32,
                     SPLIT=I32, N_SPLITS=I32, H=None, D=None, BLOCK_S=None, BLOCK_D=None, PDL=None),
                dict(H=32, D=128, BLOCK_S=8, BLOCK_D=128, PDL=True))
    gemv = dict(**{n: BF16 for n in ("x_ptr", "g_ptr", "w0_ptr", "w1_ptr", "w2_ptr", "b0_ptr", "b1_ptr", "b2_ptr",
                                     "res_ptr", "out_ptr")},
                N0=I32, N1=I32, N2=I32, eps="fp32",
                **{n: None for n in ("K", "NORM", "SWIGLU", "HAS_BIAS", "HAS_RES", "BLOCK_N", "BLOCK_K", "PDL")})
    for norm, swiglu, bias, res, pdl in ((True, False, False, False, True), (True, True, True, False, True),
                                         (False, False, True, True, False)):
        compile_one(k._gemv_kernel, gemv, dict(K=4096, NORM=norm, SWIGLU=swiglu, HAS_BIAS=bias, HAS_RES=res,
                                               PDL=pdl, **{n: v for n, v in k.gemv_config(4096, 4096, swiglu).items()
                                                           if n != "num_warps"}))
    compile_one(k._silu_mul_kernel, dict(g_ptr=BF16, u_ptr=BF16, out_ptr=BF16, N=I32, BLOCK=None, PDL=None),
                dict(BLOCK=1024, PDL=True))
    outputs = ("rep_ptr", "h2c_ptr", "kv_of_slot_ptr", "slot_of_rep_ptr", "members_ptr", "start_ptr")
    membership = dict(feat_ptr="*fp32", **{n: "*i64" for n in outputs}, F=I32,
                      **{n: None for n in ("H", "K", "GROUP", "HKV", "SLOTS_ARE_REPS", "MEDOID", "BH")})
    for H, K, group, slots_are_reps, medoid in ((32, 4, 1, True, True), (32, 3, 4, True, False),
                                                (12, 5, 3, False, True)):
        compile_one(k._membership_kernel, membership, dict(H=H, K=K, GROUP=group, HKV=H // group,
                                                           SLOTS_ARE_REPS=slots_are_reps, MEDOID=medoid,
                                                           BH=max(16, 1 << (H - 1).bit_length())))
    window = dict(**{n: BF16 for n in ("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "kwin_ptr")}, pwin_ptr="*fp32",
                  v_ptr=BF16, y_ptr=BF16, **{n: I32 for n in ("sq_b", "sq_h", "sq_s", "sk_b", "sk_h", "sk_s", "s_rope",
                                                                 "skw_b", "skw_h", "skw_t", "sv_b", "sv_h", "sv_t",
                                                                 "p0", "n")},
                  scale="fp32", **{n: None for n in ("H", "G", "W", "D", "BW", "BLOCK_D", "ROPE")})
    for G, rope in ((1, True), (4, False)):
        compile_one(k._window_kernel, window, dict(H=32, G=G, W=5, D=128, BW=16, BLOCK_D=128, ROPE=rope))
    scores = dict(**{n: BF16 for n in ("q_ptr", "k_ptr", "v_ptr", "kn_ptr", "vn_ptr", "cos_ptr", "sin_ptr")},
                  slot_ptr="*i64", pos_ptr="*i64", s_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32",
                  **{n: I32 for n in ("sq_b", "sq_c", "sk_b", "sk_s", "sk_t", "sv_b", "sv_h", "sv_t", "skn_b", "skn_s",
                                      "svn_b", "svn_h")},
                  qk_scale="fp32", T=I32, SPLIT=I32, N_SPLITS=I32,
                  **{n: None for n in ("K", "D", "N_SLOTS", "HKV", "BLOCK_T", "BLOCK_D", "STAGES", "ROPE", "PDL")})
    for rope, pdl in ((True, True), (False, False)):
        compile_one(k._cluster_scores_kernel, scores, dict(K=4, D=128, N_SLOTS=4, HKV=32, BLOCK_T=64, BLOCK_D=128,
                                                           STAGES=2, ROPE=rope, PDL=pdl))
    compile_one(k._cluster_probs_kernel,
                dict(s_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", h2c_ptr="*i64", pos_ptr="*i64", p_ptr=BF16, T=I32,
                     SPLIT=I32, N_SPLITS=I32, H=None, K=None, BLOCK_T=None, BLOCK_S=None, PDL=None),
                dict(H=32, K=4, BLOCK_T=1024, BLOCK_S=16, PDL=True))
    rope_cache = dict(**{n: BF16 for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "kc_ptr", "vc_ptr")},
                      pos_ptr="*i64", qo_ptr=BF16,
                      **{n: I32 for n in ("sq_b", "sq_h", "sk_b", "sk_h", "sv_b", "sv_h", "skc_b", "skc_h", "skc_t",
                                          "svc_b", "svc_h", "svc_t")},
                      **{n: None for n in ("H", "N_K", "HKV", "D", "BLOCK_D", "ROPE", "PDL")})
    for rope, pdl in ((True, True), (False, False)):
        compile_one(k._rope_cache_kernel, rope_cache, dict(H=32, N_K=8, HKV=8, D=128, BLOCK_D=128, ROPE=rope, PDL=pdl))
    print("all kernels compile for sm90")


if __name__ == "__main__":
    main()
