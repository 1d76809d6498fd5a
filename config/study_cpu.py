# The claims study at a size a 2-core CPU finishes in about 10 minutes per section (README, "The DeepSeekMoE
# claims"): python study.py --sections=arch,specialize --arch_scale=cpu. What differs from train.py's and
# ModelConfig's CPU defaults (4 layers of 128): a 64-wide segment, so the dense FFN is 8 segments (512) as at the
# GPU scale; study.arch_arms sets each arm's FFN. 18 runs of ~25 s each; at this size the seeds' spread is the
# finding as much as the order (README).
out_dir = "out-study-cpu"
dataset = "mix"
plot = False                         # the study draws its own pictures
save_last_only = True                # the specialize section reads the final checkpoints only
eval_interval = 20
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
max_iters = 60                       # 122,880 tokens, a thirtieth of data/mix's train split
warmup_iters = 10
