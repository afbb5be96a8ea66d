"""GPT model, presets and generation (no process group)."""
import pytest
import torch

from zerotrain.model import GPT, PRESETS, GPTConfig, KVCache, generate, get_config

MICRO = dict(vocab_size=67, block_size=24, n_layer=2, n_head=2, n_embd=32)


def micro(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**MICRO, **overrides}))


def gen_model(seed: int = 1) -> GPT:
    """A random model whose greedy continuations vary (a wide init avoids constant outputs)."""
    return micro(seed=seed, init_std=0.3)


def same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shapes_and_loss():
    model = micro()
    idx = torch.randint(0, 67, (3, 10))
    assert model(idx).shape == (3, 10, 67)
    loss = model(idx, targets=torch.randint(0, 67, (3, 10)))
    assert loss.dim() == 0
    # fresh init predicts ~uniformly: loss close to ln(V)
    assert abs(loss.item() - torch.log(torch.tensor(67.0)).item()) < 0.2
    # ignore_index=-100 drops positions from the mean
    targets = idx.clone()
    targets[:, 5:] = -100
    expected = torch.nn.functional.cross_entropy(model(idx)[:, :5].reshape(-1, 67),
                                                 idx[:, :5].reshape(-1))
    torch.testing.assert_close(model(idx, targets), expected, rtol=0, atol=1e-6)


def test_labelled_only_gives_the_same_loss_and_gradients():
    """The LM head on labelled positions alone (answer-only fine-tuning) changes no number."""
    idx = torch.randint(0, 67, (3, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.full_like(idx, -100)
    targets[0, 4:9], targets[2, 10:] = idx[0, 4:9], idx[2, 10:]        # row 1 has no label at all
    full, sparse = micro(), micro()
    loss_full, loss_sparse = full(idx, targets), sparse(idx, targets, labelled_only=True)
    torch.testing.assert_close(loss_sparse, loss_full, rtol=0, atol=1e-6)
    loss_full.backward()
    loss_sparse.backward()
    for (name, a), b in zip(full.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert sparse(idx, labelled_only=True).shape == (3, 12, 67)          # no targets: all logits


def test_submodule_names():
    model = micro()
    blk = model.blocks[0]
    assert isinstance(model.wte, torch.nn.Embedding) and isinstance(model.wpe, torch.nn.Embedding)
    assert (blk.attn.c_attn.in_features, blk.attn.c_attn.out_features) == (32, 96)
    assert (blk.attn.c_proj.in_features, blk.attn.c_proj.out_features) == (32, 32)
    assert (blk.mlp.c_fc.out_features, blk.mlp.c_proj.in_features) == (128, 128)
    for name in ("drop", "ln_f", "loss_fn"):
        assert isinstance(getattr(model, name), torch.nn.Module)
    assert model.lm_head.bias is None


def test_causal():
    model = micro()
    idx = torch.randint(0, 67, (2, 12))
    changed = idx.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 67
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=0)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_tied_weights_counted_once():
    model = micro()
    assert model.lm_head.weight is model.wte.weight
    n_unique = sum(p.numel() for p in set(model.parameters()))
    assert model.num_parameters() == n_unique
    d, L, V, T = 32, 2, 67, 24
    per_block = 12 * d * d + 13 * d
    assert model.num_parameters() == V * d + T * d + L * per_block + 2 * d
    assert model.num_parameters(exclude_embeddings=True) == L * per_block + 2 * d


def test_deterministic_init_and_meta_materialisation():
    a, b, c = micro(seed=3), micro(seed=3), micro(seed=4)
    assert same_weights(a, b)
    assert not torch.equal(a.wte.weight, c.wte.weight)
    torch.manual_seed(3)
    with torch.device("meta"):
        m = GPT(GPTConfig(**MICRO))
    assert m.wte.weight.is_meta
    m.to_empty(device="cpu")
    assert m.lm_head.weight is m.wte.weight
    m.init_weights()
    assert same_weights(a, m)
    # init statistics: biases zero, LayerNorm ones, residual projections scaled down
    blk = a.blocks[1]
    assert torch.equal(blk.attn.c_attn.bias, torch.zeros(96))
    assert torch.equal(blk.ln_1.weight, torch.ones(32))
    torch.manual_seed(0)
    big = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=8, n_head=4, n_embd=256))
    assert abs(big.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    assert abs(big.blocks[0].mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0003


@pytest.mark.parametrize("name, expected, tol", [
    ("tnlg-17b", 17.2e9, 0.1e9),
    ("megatron-8.3b", 8.3e9, 0.05e9),
    ("gpt2-124m", 124.4e6, 0.1e6),
    ("gpt2-1.5b", 1.56e9, 0.01e9),
    ("tiny", 1.5e6, 0.5e6),
    ("small", 5e6, 1e6),
])
def test_preset_sizes_on_meta(name, expected, tol):
    model = GPT.from_preset(name, device="meta")
    assert model.wte.weight.is_meta
    assert abs(model.num_parameters() - expected) <= tol
    assert model.config == PRESETS[name]


def test_preset_shapes():
    t = get_config("tnlg-17b")
    assert (t.n_layer, t.n_embd, t.n_head, t.block_size) == (78, 4256, 28, 1024)
    m = get_config("megatron-8.3b")
    assert (m.n_layer, m.n_embd, m.n_head, m.vocab_size) == (72, 3072, 32, 51200)
    small = get_config("small", vocab_size=5000)
    assert small.vocab_size == 5000 and PRESETS["small"].vocab_size == 8192


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match=r"unknown model preset 'tnlg-17'; did you mean 'tnlg-17b'"):
        get_config("tnlg-17")
    with pytest.raises(ValueError, match=r"unknown GPTConfig field 'n_heads'.*'n_head'"):
        get_config("tiny", n_heads=2)
    with pytest.raises(ValueError, match=r"n_embd=30 is not divisible by n_head=4"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=30)
    with pytest.raises(ValueError, match=r"GPTConfig.block_size must be a positive int, got 0"):
        GPTConfig(vocab_size=10, block_size=0, n_layer=1, n_head=1, n_embd=8)
    with pytest.raises(ValueError, match=r"GPTConfig.dropout"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=1, n_embd=8, dropout=1.0)


def test_forward_too_long_raises():
    model = micro()
    with pytest.raises(ValueError, match=r"needs 25 positions, but block_size is 24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match=r"needs 26 positions"):
        model(torch.zeros(1, 6, dtype=torch.long), start_pos=20)


def test_kv_cache_forward_matches_full():
    model = micro().eval()
    idx = torch.randint(0, 67, (2, 15))
    full = model(idx)
    cache = KVCache.for_model(model, 2)
    parts = [model(idx[:, :6], kv_cache=cache, start_pos=0),
             model(idx[:, 6:10], kv_cache=cache, start_pos=6),  # multi-token chunk: masked
             model(idx[:, 10:11], kv_cache=cache, start_pos=10),
             model(idx[:, 11:], kv_cache=cache, start_pos=11)]
    assert cache.length == 15
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_cache_equals_no_cache():
    model = gen_model()
    model.train()
    prompt = torch.randint(0, 67, (2, 4))
    a = generate(model, prompt, 16, greedy=True, use_cache=True)
    b = generate(model, prompt, 16, greedy=True, use_cache=False)
    assert a.shape == (2, 20)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :4], prompt)
    assert model.training  # mode restored


def test_top_k1_and_tiny_top_p_equal_greedy():
    model = gen_model(seed=2)
    prompt = torch.randint(0, 67, (2, 3))
    greedy = generate(model, prompt, 10, greedy=True)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, prompt, 10, top_k=1, generator=gen), greedy)
    assert torch.equal(generate(model, prompt, 10, top_p=1e-6, generator=gen), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=0.0), greedy)
    s1 = generate(model, prompt, 10, temperature=2.0, generator=torch.Generator().manual_seed(5))
    s2 = generate(model, prompt, 10, temperature=2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2) and not torch.equal(s1, greedy)


def expected_with_eos(ref: torch.Tensor, prompt_len: int, eos: int) -> torch.Tensor:
    """What eos handling must turn the uninterrupted greedy output ``ref`` into."""
    out, stops = ref.clone(), []
    for row in range(ref.size(0)):
        hits = (ref[row, prompt_len:] == eos).nonzero()
        stop = hits[0].item() + prompt_len if len(hits) else ref.size(1) - 1
        if len(hits):
            out[row, stop:] = eos
        stops.append(stop)
    return out[:, :max(stops) + 1]


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops_and_pads(use_cache):
    model = gen_model()
    prompt = torch.randint(0, 67, (2, 4))
    ref = generate(model, prompt, 12, greedy=True)
    padded = stopped_early = 0
    for eos in {int(ref[0, 6]), int(ref[1, 5]), int(ref[0, 4]), int(ref[1, 9])}:
        out = generate(model, prompt, 12, greedy=True, eos_id=eos, use_cache=use_cache)
        assert torch.equal(out, expected_with_eos(ref, 4, eos))
        stopped_early += out.size(1) < ref.size(1)
        padded += not torch.equal(out, ref[:, :out.size(1)])
    assert stopped_early and padded  # the cases exercise both behaviours


def test_eos_early_stop_all_rows():
    model = gen_model()
    prompt = torch.randint(0, 67, (1, 4)).repeat(2, 1)  # identical rows hit eos together
    ref = generate(model, prompt, 12, greedy=True)
    eos = int(ref[0, 7])
    out = generate(model, prompt, 12, greedy=True, eos_id=eos)
    stop = (ref[0, 4:] == eos).nonzero()[0].item() + 4
    assert out.shape == (2, stop + 1)
    assert torch.equal(out, ref[:, :stop + 1])


def test_generate_respects_block_size():
    model = micro()
    out = generate(model, torch.zeros(2, 20, dtype=torch.long), 50, greedy=True)
    assert out.shape == (2, 24)
    with pytest.raises(ValueError, match=r"prompt length 25 exceeds the model context "
                                         r"\(block_size 24\)"):
        generate(model, torch.zeros(1, 25, dtype=torch.long), 1)


def test_tiny_model_learns_repeated_sequence():
    model = micro(seed=0)
    seq = torch.tensor([[5, 17, 3, 42, 8, 23, 61, 0, 9, 33, 12, 50, 7, 2, 40, 19, 27]]).repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(seq[:, :-1], targets=seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.8
    assert losses[-1] < 0.1 * losses[0]


def test_attention_runs_on_a_head_split():
    """A tensor-parallel plan can split c_attn/c_proj by heads without touching the module."""
    import copy
    model = micro(seed=5, n_head=4)
    attn = model.blocks[0].attn.eval()
    x = torch.randn(2, 7, 32)
    full = attn(x)
    hd, parts = 8, []
    for rank in range(2):
        local = copy.deepcopy(attn)
        rows = torch.cat([torch.arange(s * 32 + rank * 16, s * 32 + rank * 16 + 16)
                          for s in range(3)])  # this rank's heads of q, k and v
        local.c_attn = torch.nn.Linear(32, 48)
        local.c_attn.load_state_dict({"weight": attn.c_attn.weight[rows],
                                      "bias": attn.c_attn.bias[rows]})
        local.c_proj = torch.nn.Linear(16, 32, bias=rank == 0)
        state = {"weight": attn.c_proj.weight[:, rank * 16:(rank + 1) * 16]}
        if rank == 0:
            state["bias"] = attn.c_proj.bias
        local.c_proj.load_state_dict(state)
        assert local.head_dim == hd
        parts.append(local(x))
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- copy head
def _copy_reference(model: GPT, idx, targets):
    """log p(target) of the copy mixture, position by position, from the parts of the model."""
    with torch.no_grad():
        pos = torch.arange(idx.size(1))
        h = model.wte(idx) + model.wpe(pos)
        for block in model.blocks:
            h = block(h)
        h = model.ln_f(h)
        vocab = torch.log_softmax(model.lm_head(h), dim=-1)
        head = model.copy_head
        q, k, g = head.query(h), head.key(h), torch.sigmoid(head.gate(h)).squeeze(-1)
        out = torch.full(idx.shape, float("nan"), dtype=h.dtype)
        for b in range(idx.size(0)):
            for t in range(idx.size(1)):
                if targets[b, t] == -100:
                    continue
                a = torch.softmax(q[b, t] @ k[b, :t + 1].T / head.query.out_features ** 0.5, dim=0)
                copied = a[idx[b, :t + 1] == targets[b, t]].sum()
                out[b, t] = torch.log(g[b, t] * vocab[b, t, targets[b, t]].exp() + (1 - g[b, t]) * copied)
    return out


def test_copy_head_loss_is_the_mixture_of_vocabulary_and_copy():
    model = micro(seed=3, copy_head=True).double()
    idx = torch.randint(0, 12, (3, 14))                    # a small id range: targets recur in the context
    targets = torch.randint(0, 12, (3, 14))
    targets[:, :4] = -100
    targets[2, 7] = 66                                     # a target found nowhere in the context
    ref = _copy_reference(model, idx, targets)
    keep = targets != -100
    expected = -ref[keep].mean()
    assert model(idx, targets).item() == pytest.approx(expected.item(), abs=1e-12)
    assert model(idx, targets, labelled_only=True).item() == pytest.approx(expected.item(), abs=1e-12)
    log_p = model(idx)                                     # the whole distribution, normalised
    assert torch.allclose(log_p.logsumexp(-1), torch.zeros(3, 14, dtype=log_p.dtype), atol=1e-12)
    assert torch.allclose(log_p.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep], ref[keep],
                          atol=1e-12)
    model(idx, targets, labelled_only=True).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.isfinite().all() for g in grads.values())
    assert all(grads[f"copy_head.{n}.weight"].abs().sum() > 0 for n in ("query", "key", "gate"))
    assert sum(p.numel() for p in model.copy_head.parameters()) == 2 * (32 * 16 + 16) + 32 + 1


def test_copy_head_only_copies_what_the_context_holds():
    """With the gate shut on the vocabulary, all probability is on tokens at positions <= t."""
    model = micro(seed=4, copy_head=True).double()
    with torch.no_grad():
        model.copy_head.gate.bias.fill_(-60.0)
    idx = torch.randint(0, 67, (2, 20))
    with torch.no_grad():
        p = model(idx).exp()
    for b in range(2):
        for t in range(20):
            seen = torch.zeros(67, dtype=torch.bool)
            seen[idx[b, :t + 1]] = True
            assert p[b, t, ~seen].sum() < 1e-12 and p[b, t, seen].sum().item() == pytest.approx(1.0, abs=1e-12)


def test_copy_head_cached_decoding_equals_the_full_forward_and_follows_reorder():
    model = micro(seed=5, copy_head=True, init_std=0.3).double().eval()
    idx = torch.randint(0, 67, (3, 18))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, 3)
        parts = [model(idx[:, :7], kv_cache=cache, start_pos=0)]
        parts += [model(idx[:, t:t + 1], kv_cache=cache, start_pos=t) for t in range(7, 12)]
        parts.append(model(idx[:, 12:], kv_cache=cache, start_pos=12))
        assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-12)
        rows = torch.tensor([2, 0, 0])                     # beam search keeps some rows, twice
        cache = KVCache.for_model(model, 3)
        model(idx[:, :10], kv_cache=cache, start_pos=0)
        cache.reorder(rows)
        step = model(idx[rows, 10:11], kv_cache=cache, start_pos=10)
        assert torch.allclose(step[:, 0], model(idx[rows, :11])[:, -1], atol=1e-12)
        assert torch.equal(generate(model, idx[:, :6], 8, greedy=True),
                           generate(model, idx[:, :6], 8, greedy=True, use_cache=False))
