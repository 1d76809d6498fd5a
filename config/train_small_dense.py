# The dense baseline of config/train_small.py: the same model with every FFN a dense SwiGLU of hidden 3072,
# the active FFN width of the MoE layers ((6 + 2) * 384), so both spend the same FLOPs per token (bar the router).
# Compare tokens/s, MFU and loss with the MoE at equal active compute:
#     python train.py config/train_small_dense.py --compile   (vs config/train_small.py)
out_dir = "out-small-dense"
eval_interval = 250
eval_iters = 50
log_interval = 10
dataset = "shakespeare"
batch_size = 16
gradient_accumulation_steps = 2      # 16 x 1024 x 2 = 32,768 tokens per step
# model (every other ModelConfig field keeps model.py's default)
block_size = 1024
n_layer = 12
n_embd = 768
n_head = 12
q_lora_rank = 0
kv_lora_rank = 256
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
n_dense_layers = 12                  # = n_layer: no MoE layer
dense_inter_dim = 3072
n_experts = 64
top_k = 6
n_shared = 2
moe_inter_dim = 384
balance = "bias"
# optimizer
learning_rate = 6e-4
max_iters = 2000
warmup_iters = 100
min_lr = 6e-5
weight_decay = 0.1
beta2 = 0.95
