# The claims study on one GPU (README, "The DeepSeekMoE claims"): python study.py --sections=arch,specialize
# then --sections=tradeoff. What differs from train.py's and ModelConfig's defaults; study.arch_arms sets each arm's
# FFN. The width and depth of the probe: 6 layers of 384, 6 heads, kv_lora_rank 128, 64 x 512 = 32,768
# tokens per step, compiled, lr 2e-3 (train.py's default). A segment is 192 wide: the dense FFN is 8 segments
# (1536), every MoE arm holds 64 segments of experts and runs 8 per token.
#
# Run length, the estimate it was sized by (the README's "The scales" has what an H200 measured; study.py prints
# every run's seconds and a projected total):
#   600 steps x 32,768 = 19.7M tokens per run (the probe's first point): on data/claims 0.2 passes over its math,
#   0.2 over its code, ~1.2 over its language text (5.3 passes over data/mix's 3.7M, where the probe saw the MoE
#   arms start to memorize by 8 passes).
#   Steps, from the probe's tokens/s (compiled, H200): dense 1.6-2.4M tok/s -> 8-12 s; MoE 1.0-1.5M -> 13-20 s.
#   Per run besides: start-up (imports, CUDA context, data, model) ~8 s; torch.compile ~30 s the first time an arm's
#   shapes are seen, a few s for seeds 2-3 (inductor's on-disk cache), ~15 s on average; 7 evaluations of
#   2 x 10 x 32,768 tokens, uncompiled forwards, ~2 s together; one save at the end (save_last_only: 82M params x
#   12 bytes = ~1 GB for an MoE arm, ~1 s). About 25 s a run.
#   arch: 18 runs = 3 dense x (8-12 + 25) + 15 MoE x (13-20 + 25) = 680-790 s; specialize: 6 checkpoints over
#   1M val tokens, ~30 s. Total ~12-14 min of the 15. tradeoff: 9 DeepSeekMoE runs x (13-20 + 25) = 340-400 s of
#   the 10 min. What an H200 measured, and where the time went, is in the README ("The scales").
#   A device command limited to 10 minutes: run again with --runs=reuse, which reads the runs already finished.
out_dir = "out-study"
dataset = "claims"                   # python prepare.py --corpus=claims (100M train tokens: no run repeats code or
                                     # math); study.py --dataset=mix runs it on the small corpus instead
compile = True
compile_blocks = True                # each block compiled on its own, and the head with its loss: identical blocks
                                     # compile once, so the first steps wait a fraction of the whole model's compile
plot = False                         # the study draws its own pictures
save_last_only = True                # the specialize section reads the final checkpoints only
eval_interval = 100                  # 7 evaluations per run: the curves of arch_tokens.png and arch_seconds.png
eval_iters = 10                      # 10 x 64 x 512 = 327,680 val tokens, every domain in its share
log_interval = 20
batch_size = 64
# model
block_size = 512                     # 64 x 512 = 32,768 tokens per step
n_layer = 6
n_embd = 384
n_head = 6
kv_lora_rank = 128
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
dense_inter_dim = 1536               # 8 segments of 192: the first (dense) block of every arm, and the dense arm
n_experts = 62                       # the DeepSeekMoE arm: 2 shared + top-6 of 62 segments
top_k = 6
n_shared = 2
moe_inter_dim = 192                  # the segment
# optimizer
max_iters = 600                      # 19.7M tokens (the arithmetic above)
warmup_iters = 50
