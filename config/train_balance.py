# The load-balancing ablation (README "Results"): a scaled-down "small" with the paper's expert layout
# (Wang et al. / DeepSeekMoE: 64 experts, top-6, 2 shared). Same data, tokens and seed for every run:
#     python study.py --sections=balance           # all four below, then the table and out/balance/balance.png
#     python train.py config/train_balance.py --balance=bias --out_dir=out-bias
#     python train.py config/train_balance.py --balance=aux --aux_alpha=0.01 --out_dir=out-aux0.01
#     python train.py config/train_balance.py --balance=aux --aux_alpha=0.001 --out_dir=out-aux0.001
#     python train.py config/train_balance.py --balance=none --out_dir=out-none
out_dir = "out-balance"
eval_iters = 20                       # 20 x 16 x 512 tokens: about all of data/shakespeare's val, for MaxVio_global
# model: 4 layers (1 dense + 3 MoE) of width 256
block_size = 512                      # 16 x 512 = 8,192 tokens per step
n_embd = 256
kv_lora_rank = 64
dense_inter_dim = 1024
n_experts = 64
top_k = 6
n_shared = 2                          # (6 + 2) * 128 = 1024 = 4 * n_embd
# optimizer: 800 steps
learning_rate = 1e-3
max_iters = 800
warmup_iters = 50
min_lr = 1e-4
