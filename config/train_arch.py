# The architecture ablation of DeepSeekMoE (arXiv 2401.06066, its fine-grained segmentation and shared-expert
# isolation ablations), on a GPU: config/train_small.py's width and depth on data/mix (python prepare.py
# --corpus=mix), one pass over its train split at most. `python study.py --sections=arch` runs the five variants
# (study.arch_variants: dense, coarse top-2 of 16, 1 shared + top-1 of 15, fine-grained 2 shared + top-6 of 62,
# fine-grained top-8 of 64), each with --balance=bias and the same active FFN width, data, tokens and seed.
exec(open(__file__.replace("_arch.py", "_small.py")).read())  # everything config/train_small.py sets, then:
out_dir = "out-arch"
dataset = "mix"
gradient_accumulation_steps = 1      # 16 x 1024 = 16,384 tokens per step
max_iters = 220                      # 3.6M tokens: just under one pass over data/mix's 3.7M train tokens
warmup_iters = 20
eval_interval = 20
eval_iters = 20                      # 327,680 of val's ~420K tokens, every domain in its share
n_experts = 62                       # 2 shared + 62 routed = 64 segments of 384, the other MoE variants' total
