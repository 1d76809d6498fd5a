# The architecture ablation (config/train_arch.py) at a size a 2-core CPU trains in about a minute per variant:
# ModelConfig's CPU width and depth (4 layers of 128) with the same ratios as the GPU ablation: active FFN hidden
# 4 * n_embd = 512 = 8 segments of 64; the MoE variants hold 64 segments of experts (study.arch_variants).
#     python study.py --sections=arch --arch_scale=cpu
out_dir = "out-arch-cpu"
dataset = "mix"
eval_interval = 50
eval_iters = 10                      # 10 x 16 x 128 = 20,480 val tokens per evaluation
block_size = 128                     # 16 x 128 = 2,048 tokens per step
# model: what differs from ModelConfig's (CPU) defaults
dense_inter_dim = 512
n_experts = 62
top_k = 6
n_shared = 2
moe_inter_dim = 64
# optimizer
max_iters = 200                      # 409,600 tokens, a ninth of data/mix's train split
warmup_iters = 20
