"""
Generation with the latent cache (DeepSeek-V2 section 2.1): the decoding loop, the decoding step captured in a CUDA
graph, self-speculative decoding with the MTP module (DeepSeek-V3 section 2.2), and sampling. model.py is the
architecture; this file runs it one token at a time. sample.py is its command line.

    from generate import generate, generate_stream
    out = generate(model, idx, 100, temperature=0.8, top_k=200)   # idx (B, T) -> (B, T + 100)
    for tok in generate_stream(model, idx, 100, cuda_graph=True):  # (B, 1) at a time

The prompt is prefilled once (naive MLA), then each new token attends to the latent cache (absorbed MLA). On a GPU
the decoding step is captured once in a CUDA graph and replayed: the step is hundreds of small kernels whose
launches, not the GPU, would otherwise set the speed (README, "Decoding").
"""
import functools

import torch
import torch.nn.functional as F

from mla import LatentCache

# -----------------------------------------------------------------------------
# the cache and the step


def new_cache(model, batch, max_len, device=None, dtype=None, mtp=False):
    """A LatentCache of the model's layers, and of its MTP blocks after them with mtp=True (speculation)."""
    p = model.embed.weight
    n = model.config.n_layer + (model.config.mtp_depth if mtp else 0)
    return LatentCache(model.config, batch, max_len, device or p.device, dtype or p.dtype, n_layer=n)


def decode_step(model, tokens, pos, cache):
    """tokens (B, T) at positions pos.. (an int, or a 0-d device tensor when captured) -> the last position's
    logits (B, vocab) in float32, the cache updated. The one step generate_stream runs, prefill and decode."""
    return model(tokens, cache=cache, start_pos=pos)[0][:, -1].float()


# -----------------------------------------------------------------------------
# the decoding loop


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                    use_cache=True, cuda_graph=False, compile=False, cache=None, speculative=False, stats=None):
    """Yield the next (B, 1) tokens one step at a time for the batch of prompts idx (B, T). Call in eval mode.

    use_cache: prefill the prompts once into a LatentCache ([c_kv ; k_pe] per token per layer, nothing else),
        then feed one token per step (absorbed MLA). A full cache (block_size) is refilled with the last half of
        the context at positions 0.. and decoding goes on. Without: recompute the whole sequence (its last
        block_size tokens) every step, as nanoGPT does.
    cuda_graph: capture the decoding step once in a CUDA graph and replay it every step (CapturedStep; the
        prefill stays eager). The same math as the eager path (the same tokens in fp32), launched by the GPU.
        On a CPU it runs the same static, position-on-device step without capture.
    compile: with cuda_graph, torch.compile the decoding step before the capture: Inductor fuses its small
        elementwise kernels (norms, RoPE, router), so the graph replays fewer, fuller kernels.
    cache: the cache to decode into, of at least min(T + max_new_tokens, block_size) positions: a LatentCache
        (default: new_cache's, in the model's dtype) or mla.MHACache (the baseline bench.py measures it against).
    speculative: draft with the first MTP module and verify with the model (speculate(); with cuda_graph its
        three steps are captured); stats: a dict that receives its counts of drafts and accepted drafts.
    """
    if speculative:
        yield from speculate(model, idx, max_new_tokens, temperature, top_k, top_p, generator, stats, cuda_graph)
        return
    B, T = idx.shape
    block_size = model.config.block_size
    if not use_cache:
        seq = idx
        for _ in range(max_new_tokens):
            nxt = sample_next(model(seq[:, -block_size:])[0][:, -1], temperature, top_k, top_p, generator)
            yield nxt
            seq = torch.cat([seq, nxt], dim=1)
        return
    max_len = min(T + max_new_tokens, block_size)
    cache = new_cache(model, B, max_len) if cache is None else cache
    step = functools.partial(decode_step, model)
    logits, pos = step(idx, 0, cache), T  # prefill
    graph = None
    if cuda_graph and max_new_tokens > 1:  # captured before the first token, so the steps after it are all replays
        decode = torch.compile(step, dynamic=False) if compile else step

        def advance(tokens, p):  # one step at position p (a device tensor), which the graph then advances
            logits = decode(tokens, p, cache)
            p += 1
            return logits
        graph = CapturedStep(advance, torch.zeros(B, 1, dtype=torch.long, device=idx.device),
                             torch.tensor(pos, device=idx.device))
    new = []  # the generated tokens, kept for a refill
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        if i == max_new_tokens - 1:
            break
        new.append(nxt)
        if pos == max_len:  # cache full: keep the last half of the context, at positions 0.. (RoPE is absolute)
            keep = max(block_size // 2, 1)
            logits, pos = step(torch.cat([idx] + new, dim=1)[:, -keep:], 0, cache), keep
            if graph is not None:
                graph.inputs[1].fill_(pos)
            continue
        logits = graph(nxt) if graph is not None else step(nxt, pos, cache)
        pos += 1


@torch.no_grad()
def speculate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, stats=None,
              cuda_graph=False):
    """Self-speculative decoding with the first MTP module (DeepSeek-V3 section 2.2 uses it so): it drafts the
    token after next, and one forward pass of the model over [token, draft] both checks the draft and gives
    the token after it. A draft d is accepted with probability min(1, p(d) / q(d)) (p: the model's filtered
    distribution, q: the draft's), else the token is drawn from max(0, p - q) normalized: the tokens have
    exactly the distribution of plain sampling (greedy: the draft is accepted when it is the argmax). A step
    emits two tokens when every row of the batch accepts, else one (the rows keep one shared position).
    With cuda_graph the three steps (verify two tokens; draft after two, or after one) are each captured
    once and replayed, the position in a device tensor; the host reads one flag per step (all accepted?).
    Yields (B, 1) tokens like generate_stream; stats gets {"drafts": n, "accepted": n}."""
    if not model.mtp:
        raise ValueError("speculative decoding needs an MTP module: train with --mtp_depth=1")
    B, T = idx.shape
    if T + max_new_tokens + 1 > model.config.block_size:
        raise ValueError(f"speculative decoding keeps the whole context: prompt ({T}) + max_new_tokens "
                         f"({max_new_tokens}) + 1 must fit block_size {model.config.block_size}")
    stats = {} if stats is None else stats
    stats.update(drafts=0, accepted=0)
    mtp, mtp_cache = model.mtp[0], model.config.n_layer
    cache = new_cache(model, B, T + max_new_tokens + 1, mtp=True)

    def probs(logits):  # (..., V) -> sample_next's distributions, (..., V)
        return sample_probs(logits.float().flatten(0, -2), temperature, top_k, top_p).view(logits.shape)

    def verify(tokens, pos):  # the model over tokens at pos..: its states and next-token logits
        h = model.hidden(tokens, cache, pos)
        return h, model.head(model.norm(h))

    def draft_logits(h, tokens, pos):  # MTP over pos.. (h: the model's states there; tokens: one ahead of them)
        cos, sin = model.rope(h.shape[1], pos)
        g = mtp(h, model.embed(tokens), cos, sin, cache.layer(mtp_cache), pos)
        return model.head(mtp.norm(g[:, -1]))  # the token two ahead of the last position

    steps = {}  # captured on first use: "verify", "draft 2", "draft 1"

    def run(name, fn, *args):
        if not cuda_graph:
            return fn(*args)
        if name not in steps:
            steps[name] = CapturedStep(fn, *args)
        return steps[name](*args)

    def draft(q_logits):
        q = probs(q_logits)
        return torch.multinomial(q, 1, generator=generator), q

    h = model.hidden(idx, cache)  # prefill
    tok = sample_next(model.head(model.norm(h[:, -1])).float(), temperature, top_k, top_p, generator)
    yield tok
    d, q = draft(draft_logits(h, torch.cat([idx[:, 1:], tok], dim=1), 0))
    pos = torch.tensor(T, device=idx.device) if cuda_graph else T
    emitted = 1
    while emitted < max_new_tokens:
        h, logits = run("verify", verify, torch.cat([tok, d], dim=1), pos)  # tok at pos, the draft at pos + 1
        p = probs(logits)  # (B, 2, V)
        p_d, q_d = p[:, 0].gather(1, d), q.gather(1, d)
        accept = torch.rand(B, 1, device=idx.device, generator=generator) * q_d < p_d  # P = min(1, p/q)
        stats["drafts"] += B
        n_accepted = int(accept.sum())  # the one sync of a step
        stats["accepted"] += n_accepted
        if n_accepted == B:
            bonus = torch.multinomial(p[:, 1], 1, generator=generator)
            yield d
            emitted += 1
            if emitted < max_new_tokens:
                yield bonus
                emitted += 1
            d, q = draft(run("draft 2", draft_logits, h, torch.cat([d, bonus], dim=1), pos))
            tok, pos = bonus, pos + 2
        else:
            residual = (p[:, 0] - q).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, 0])
            tok = torch.where(accept, d, torch.multinomial(residual, 1, generator=generator))
            yield tok
            emitted += 1
            # the draft's row in the cache is rewritten by the next step
            d, q = draft(run("draft 1", draft_logits, h[:, :1], tok, pos))
            pos = pos + 1


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None, **kwargs):
    """nanoGPT's generate: returns idx (B, T) followed by max_new_tokens sampled tokens (kwargs: generate_stream's)."""
    was_training = model.training
    model.eval()  # generation never counts tokens for the bias update
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, generator, **kwargs))
    model.train(was_training)
    return torch.cat([idx] + new, dim=1)


# -----------------------------------------------------------------------------
# the captured step


class CapturedStep:
    """fn(*inputs) captured once in a CUDA graph on static copies of its tensor inputs, then replayed: the GPU
    launches the call's kernels itself, back to back, so the host's cost is one replay. A call copies its
    arguments into the first static inputs (the others keep their values, e.g. a position that the captured fn
    advances itself) and returns the static outputs, which the next replay overwrites. A position passed as a 0-d
    device tensor leaves nothing on the host to change between replays: the RoPE rows, the cache rows written and
    the keys attended to are all picked on the device. On a CPU fn runs as it is (the tests' check of the same
    static computation). It holds the graph, the static inputs and the static outputs."""

    def __init__(self, fn, *inputs):
        self.fn, self.inputs, self.graph = fn, [x.clone() for x in inputs], None
        if self.inputs[0].is_cuda:
            side = torch.cuda.Stream(self.inputs[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, lazy inits, cuBLAS handles
                for _ in range(2):  # on the real inputs: the cache rows it writes are the ones the call will write
                    fn(*[x.clone() for x in self.inputs])
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = fn(*self.inputs)

    def __call__(self, *args):
        for static, x in zip(self.inputs, args):
            static.copy_(x)
        if self.graph is None:
            return self.fn(*self.inputs)
        self.graph.replay()
        return self.outputs


# -----------------------------------------------------------------------------
# sampling


def sample_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> the distribution sample_next draws from (B, V): tempered, top-k and top-p filtered.
    temperature 0 (any below 1e-5) or top_k 1 puts all the mass on the argmax; top_k None or 0 keeps every token,
    top_p None or 1 is off."""
    if not (temperature >= 0 and (top_k is None or top_k >= 0) and (top_p is None or 0 < top_p <= 1)):
        raise ValueError(f"sampling needs temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, {top_k}, "
                         f"{top_p}")
    # below 1e-5 sampling is greedy in effect, and far smaller temperatures overflow the logits to inf (then NaN)
    if temperature < 1e-5 or top_k == 1:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None and top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> (B, 1) drawn from sample_probs; greedy (argmax) where that is one-hot."""
    if 0 <= temperature < 1e-5 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(sample_probs(logits, temperature, top_k, top_p), 1, generator=generator)
