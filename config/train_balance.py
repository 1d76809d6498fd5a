# The load-balancing ablation (README "Results"): a scaled-down "small" with the paper's expert layout
# (Wang et al. / DeepSeekMoE: 64 experts, top-6, 2 shared). Same data, tokens and seed for every run:
#     python bench.py --sections=balance           # all four below, then the table and out/balance/balance.png
#     python train.py config/train_balance.py --balance=bias --out_dir=out-bias
#     python train.py config/train_balance.py --balance=aux --aux_alpha=0.01 --out_dir=out-aux0.01
#     python train.py config/train_balance.py --balance=aux --aux_alpha=0.001 --out_dir=out-aux0.001
#     python train.py config/train_balance.py --balance=none --out_dir=out-none
out_dir = "out-balance"
eval_interval = 100
eval_iters = 20                       # 20 x 16 x 512 = 164K tokens: about all of val (172K), for MaxVio_global
log_interval = 10
dataset = "shakespeare"
batch_size = 16
gradient_accumulation_steps = 1      # 16 x 512 = 8,192 tokens per step
# model: 4 layers (1 dense + 3 MoE) of width 256
block_size = 512
n_layer = 4
n_embd = 256
n_head = 4
q_lora_rank = 0
kv_lora_rank = 64
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
n_dense_layers = 1
dense_inter_dim = 1024
n_experts = 64
top_k = 6
n_shared = 2
moe_inter_dim = 128                   # (6 + 2) * 128 = 1024 = 4 * n_embd
score_func = "sigmoid"
balance = "bias"
bias_update_rate = 1e-3
# optimizer: 800 steps = 6.6M tokens, ~4 passes over data/shakespeare's 1.5M
learning_rate = 1e-3
max_iters = 800
warmup_iters = 50
min_lr = 1e-4
weight_decay = 0.1
beta2 = 0.95
