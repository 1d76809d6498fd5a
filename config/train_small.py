# The GPU "small" reference config: about GPT-2 small's active compute per token (README, "The config").
# 12 layers of MLA + DeepSeekMoE (the first dense), 64 fine-grained experts, top-6, 2 shared, 384 wide each:
# (6 + 2) * 384 = 3072 = the dense baseline's FFN (config/train_small_dense.py), so active FLOPs match.
#     python train.py config/train_small.py --compile
# data/shakespeare is small for a model this size (it passes over it many times in 2,000 iters): for more than
# throughput numbers point it at a bigger corpus (python prepare.py --input=... ; --dataset=NAME).
out_dir = "out-small"
eval_interval = 250
eval_iters = 50
batch_size = 32                      # one micro-batch of 32 x 1024 = 32,768 tokens per step, rather than two of 16:
gradient_accumulation_steps = 1      # no second backward adding its expert gradients into the first (12 bytes per
                                     # parameter; 4-6x the dense model's parameters, by vocabulary), twice the rows
                                     # per expert GEMM (README, "Training step"); short of memory, halve batch_size
                                     # and double this
# model: what differs from ModelConfig's (CPU) defaults
block_size = 1024
n_layer = 12
n_embd = 768
n_head = 12
kv_lora_rank = 256
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
dense_inter_dim = 3072
n_experts = 64
top_k = 6
n_shared = 2
moe_inter_dim = 384
# optimizer
learning_rate = 6e-4
max_iters = 2000
warmup_iters = 100
min_lr = 6e-5
moments_dtype = "bfloat16"           # AdamW's moments in bf16, as DeepSeek-V3 (§3.3.3): the 80-step losses within noise
                                     # of fp32's, a smaller checkpoint and a faster step (README, "Training step")
