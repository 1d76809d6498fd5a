# The dense baseline of config/train_small.py: the same model with every FFN a dense SwiGLU of hidden 3072,
# the active FFN width of the MoE layers ((6 + 2) * 384), so both spend the same FLOPs per token (bar the router).
#     python train.py config/train_small_dense.py --compile   (vs config/train_small.py)
exec(open(__file__.replace("_dense.py", ".py")).read())  # everything config/train_small.py sets, then:
out_dir = "out-small-dense"
n_dense_layers = 12                  # = n_layer: no MoE layer
