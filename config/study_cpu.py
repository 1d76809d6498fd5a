# The claims study at a size a 2-core CPU finishes in about 10 minutes (README, "The DeepSeekMoE claims"):
# python study.py --sections=arch,specialize --arch_scale=cpu, then --sections=tradeoff. What differs from
# train.py's and ModelConfig's CPU defaults (4 layers of 128): a 64-wide segment, so the dense FFN is 8 segments
# (512) as at the GPU scale; study.arch_arms sets each arm's FFN. 18 runs of 21-30 s each (60 steps took 33-40 s a
# run, 14 minutes with specialization: too long); at this size the seeds' spread is the finding as much as the
# order (README).
out_dir = "out-study-cpu"
dataset = "mix"
plot = False                         # the study draws its own pictures
save_last_only = True                # the specialize section reads the final checkpoints only
eval_interval = 10                   # 5 evaluations: the curves of arch_tokens.png and arch_seconds.png
eval_iters = 4                       # 4 x 16 x 128 = 8,192 val tokens per evaluation
log_interval = 5
threads = 2
# model
block_size = 128                     # 16 x 128 = 2,048 tokens per step
n_layer = 3                          # 1 dense + 2 MoE blocks
dense_inter_dim = 512
n_experts = 62
top_k = 6
n_shared = 2
moe_inter_dim = 64
# optimizer
max_iters = 40                       # 81,920 tokens, a 45th of data/mix's train split
warmup_iters = 10
