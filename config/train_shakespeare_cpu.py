# The CPU default (train.py's own defaults, written out to copy and edit): a few minutes on a 2-core CPU.
# A 4-layer MLA + DeepSeekMoE model (1 dense layer, then 3 MoE layers of 8 experts, top-2, 1 shared) on
# data/shakespeare with prepare.py's 2,048-token BPE.
#     python train.py config/train_shakespeare_cpu.py      # the same as: python train.py
out_dir = "out"
eval_interval = 100
eval_iters = 10
log_interval = 10
dataset = "shakespeare"
batch_size = 16
gradient_accumulation_steps = 1      # 16 x 64 = 1,024 tokens per step
# model
block_size = 64
n_layer = 4
n_embd = 128
n_head = 4
kv_lora_rank = 32
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
n_dense_layers = 1
dense_inter_dim = 384                # (top_k + n_shared) * moe_inter_dim
n_experts = 8
top_k = 2
n_shared = 1
moe_inter_dim = 128
balance = "bias"
bias_update_rate = 1e-3
# optimizer
learning_rate = 2e-3
max_iters = 400
warmup_iters = 30
weight_decay = 0.1
beta2 = 0.95
device = "auto"                      # cuda if available, else cpu
