"""Tests for flatdino_cli.nn: attention vs a naive reference, RoPE properties, adaLN-Zero identity,
norms, fixed tables and the conditioning embedders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flatdino_cli.nn import (AdaLN, AdaLNBlock, Attention, Block, FinalLayer, GaussianFourierEmbedder, GeluMLP,
                             LabelEmbedder, RMSNorm, SwiGLU, apply_rope, make_norm, modulate,
                             rope_1d, rope_2d, sincos_1d, sincos_2d)

torch.manual_seed(0)


# ----------------------------------------------------------------------------- attention
def _naive_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # interleaved pairs (x0, x1) as complex x0 + i x1, rotated by the angle encoded in (cos, sin)
    ang = torch.atan2(sin[:, 0::2], cos[:, 0::2])  # (N, hd/2)
    xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang).double(), ang.double())).flatten(-2).to(x.dtype)


def _naive_attention(x, q_lin, k_lin, v_lin, proj, heads, qk_norm=None, q_w=None, k_w=None, rope=None):
    B, N, C = x.shape
    hd = C // heads
    q, k, v = (lin(x).reshape(B, N, heads, hd).transpose(1, 2) for lin in (q_lin, k_lin, v_lin))
    if qk_norm == "layernorm":
        q = (q - q.mean(-1, keepdim=True)) / torch.sqrt(q.var(-1, unbiased=False, keepdim=True) + 1e-6) * q_w
        k = (k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + 1e-6) * k_w
    elif qk_norm == "rmsnorm":
        q = q / torch.sqrt(q.square().mean(-1, keepdim=True) + 1e-6) * q_w
        k = k / torch.sqrt(k.square().mean(-1, keepdim=True) + 1e-6) * k_w
    if rope is not None:
        q, k = _naive_rope(q, *rope), _naive_rope(k, *rope)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return proj((att @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("qk_norm", [None, "layernorm", "rmsnorm"])
@pytest.mark.parametrize("use_rope", [False, True])
def test_attention_matches_naive_softmax(qk_norm, use_rope):
    dim, heads, N = 32, 4, 7
    q_lin, k_lin, v_lin = (nn.Linear(dim, dim) for _ in range(3))
    attn = Attention(dim, heads, qk_norm=qk_norm)
    attn.load_qkv(q_lin, k_lin, v_lin.state_dict())  # also checks the fused [q; k; v] layout
    q_w = k_w = None
    if qk_norm is not None:
        with torch.no_grad():  # non-trivial scales so a wrong q/k pairing would show
            attn.q_norm.weight.uniform_(0.5, 1.5)
            attn.k_norm.weight.uniform_(0.5, 1.5)
        q_w, k_w = attn.q_norm.weight, attn.k_norm.weight
        assert not hasattr(attn.q_norm, "bias") or attn.q_norm.bias is None
    rope = rope_1d(N, dim // heads) if use_rope else None
    x = torch.randn(2, N, dim)
    got = attn(x, rope)
    ref = _naive_attention(x, q_lin, k_lin, v_lin, attn.proj, heads, qk_norm, q_w, k_w, rope)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_load_qkv_rejects_wrong_shapes_and_missing_bias():
    attn = Attention(16, 2)
    with pytest.raises(ValueError):
        attn.load_qkv(*(nn.Linear(8, 8) for _ in range(3)))
    with pytest.raises(ValueError):
        attn.load_qkv(*(nn.Linear(16, 16, bias=False) for _ in range(3)))


# ----------------------------------------------------------------------------- rope
def _score(q, k, cos, sin, m, n):
    qr = apply_rope(q.view(1, 1, 1, -1), cos[m:m + 1], sin[m:m + 1])
    kr = apply_rope(k.view(1, 1, 1, -1), cos[n:n + 1], sin[n:n + 1])
    return (qr * kr).sum().item()


def test_rope_1d_scores_depend_only_on_offset():
    hd = 16
    cos, sin = rope_1d(40, hd)
    q, k = torch.randn(hd), torch.randn(hd)
    base = _score(q, k, cos, sin, 5, 2)
    for s in (1, 7, 30):
        assert _score(q, k, cos, sin, 5 + s, 2 + s) == pytest.approx(base, abs=1e-4)
    assert abs(_score(q, k, cos, sin, 5, 3) - base) > 1e-3  # a different offset gives a different score


def test_rope_2d_scores_depend_only_on_offset():
    h, w, hd = 6, 7, 16
    cos, sin = rope_2d(h, w, hd)
    q, k = torch.randn(hd), torch.randn(hd)
    idx = lambda i, j: i * w + j  # noqa: E731  (row-major tokens)
    base = _score(q, k, cos, sin, idx(1, 2), idx(0, 4))
    for di, dj in [(1, 0), (0, 2), (3, 1)]:
        assert _score(q, k, cos, sin, idx(1 + di, 2 + dj), idx(0 + di, 4 + dj)) == pytest.approx(base, abs=1e-4)
    # moving only one of the two tokens along either axis changes the score: both axes are encoded
    assert abs(_score(q, k, cos, sin, idx(2, 2), idx(0, 4)) - base) > 1e-3
    assert abs(_score(q, k, cos, sin, idx(1, 3), idx(0, 4)) - base) > 1e-3


def test_rope_zero_position_is_identity():
    x = torch.randn(2, 3, 1, 8)
    for cos, sin in (rope_1d(5, 8), rope_2d(3, 3, 8)):
        torch.testing.assert_close(apply_rope(x, cos[:1], sin[:1]), x)


def test_rope_tables_hand_values():
    cos, sin = rope_1d(6, 4)  # freqs [1, 1e-2], each repeated twice
    torch.testing.assert_close(torch.atan2(sin[5], cos[5]), torch.tensor([5 - 2 * math.pi] * 2 + [0.05] * 2))
    cos, sin = rope_2d(4, 5, 8)  # per-axis dim 4: freqs [1, 1e-2]; rows first, then columns
    ang = torch.tensor([2, 2, 0.02, 0.02, 3, 3, 0.03, 0.03])
    torch.testing.assert_close(cos[2 * 5 + 3], ang.cos())
    torch.testing.assert_close(sin[2 * 5 + 3], ang.sin())


def test_rotate_half_is_interleaved():
    x = torch.arange(4.0).view(1, 1, 1, 4)
    c, s = torch.zeros(1, 4), torch.ones(1, 4)  # 90 degrees: output = rotate_half(x)
    assert apply_rope(x, c, s).flatten().tolist() == [-1.0, 0.0, -3.0, 2.0]


# ----------------------------------------------------------------------------- blocks
def test_adaln_block_is_identity_at_init_and_final_layer_zero():
    dim, N = 32, 6
    blk = AdaLNBlock(dim, 4, 64, cond_dim=24)
    fin = FinalLayer(dim, 10, cond_dim=24)
    x, rope = torch.randn(2, N, dim), rope_1d(N, dim // 4)
    for c in (torch.randn(2, 24), torch.randn(2, N, 24)):
        torch.testing.assert_close(blk(x, c, rope), x, atol=0, rtol=0)
        out = fin(x, c)
        assert out.shape == (2, N, 10) and out.abs().max().item() == 0.0


def test_adaln_block_per_token_matches_per_sample_and_modulates():
    dim, N = 16, 5
    blk = AdaLNBlock(dim, 2, 32)
    for p in blk.adaLN_modulation.parameters():
        nn.init.normal_(p, std=0.1)
    x, c = torch.randn(2, N, dim), torch.randn(2, dim)
    y = blk(x, c)
    assert (y - x).abs().max() > 1e-3
    torch.testing.assert_close(blk(x, c[:, None].expand(2, N, dim)), y)
    c_tok = c[:, None].repeat(1, N, 1)
    c_tok[:, 0] += 1.0  # change only token 0's conditioning
    y2 = blk(x, c_tok)
    assert (y2[:, 0] - y[:, 0]).abs().max() > 1e-4


def test_adaln_chunk_order_and_modulate_broadcast():
    ada = AdaLN(4, 3, 6)
    with torch.no_grad():
        ada[1].bias.copy_(torch.arange(18.0))
    chunks = ada(torch.zeros(2, 4))
    assert len(chunks) == 6 and chunks[2][0].tolist() == [6.0, 7.0, 8.0]  # gate_msa is the third
    x = torch.randn(2, 5, 3)
    shift, scale = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(modulate(x, shift[:, None].expand(2, 5, 3), scale[:, None].expand(2, 5, 3)),
                               modulate(x, shift, scale))


@pytest.mark.parametrize("norm,mlp,qk", [("layernorm", "swiglu", "layernorm"), ("rmsnorm", "gelu", None)])
def test_block_gradients_flow(norm, mlp, qk):
    blk = Block(16, 2, 32, norm=norm, norm_eps=1e-6, mlp=mlp, qk_norm=qk)
    x = torch.randn(2, 5, 16, requires_grad=True)
    blk(x, rope_1d(5, 8)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_block_layout_for_pixel_decoder():
    blk = Block(16, 2, 64, norm="layernorm", norm_eps=1e-12, mlp="gelu")
    assert blk.norm1.eps == 1e-12 and blk.norm1.bias is not None
    assert isinstance(blk.mlp, GeluMLP) and blk.attn.qkv.bias is not None


# ----------------------------------------------------------------------------- norms and MLPs
def test_rmsnorm_matches_formula_and_keeps_dtype():
    n = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        n.weight.uniform_(0.5, 2.0)
    x = torch.randn(3, 8)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref)
    xb = x.bfloat16()
    assert n(xb).dtype == torch.bfloat16
    torch.testing.assert_close(n(xb).float(), n(xb.float()).bfloat16().float())
    assert len(list(RMSNorm(8, affine=False).parameters())) == 0


def test_make_norm():
    ln = make_norm("layernorm", 8, 1e-12)
    assert isinstance(ln, nn.LayerNorm) and ln.eps == 1e-12 and ln.bias is not None
    assert make_norm("layernorm", 8, 1e-6, affine=False).weight is None
    assert isinstance(make_norm("rmsnorm", 8, 1e-6), RMSNorm)
    with pytest.raises(ValueError):
        make_norm("batchnorm", 8, 1e-6)


def test_swiglu_and_gelu_formulas():
    m = SwiGLU(6, 5)
    x = torch.randn(4, 6)
    w1, w2 = m.w12.weight[:5], m.w12.weight[5:]
    b1, b2 = m.w12.bias[:5], m.w12.bias[5:]
    ref = m.w3(torch.nn.functional.silu(x @ w1.T + b1) * (x @ w2.T + b2))
    torch.testing.assert_close(m(x), ref)
    g = GeluMLP(6, 5)
    h = g.fc1(x)
    torch.testing.assert_close(g(x), g.fc2(0.5 * h * (1 + torch.erf(h / math.sqrt(2)))))


# ----------------------------------------------------------------------------- tables
def test_sincos_2d_hand_values_and_cls_row():
    emb = sincos_2d(3, 4, 8)  # omega = [1, 1/100]; first half column j, second half row i
    assert emb.shape == (12, 8) and emb.dtype == torch.float32
    i, j = 2, 1
    ref = [math.sin(j), math.sin(j / 100), math.cos(j), math.cos(j / 100),
           math.sin(i), math.sin(i / 100), math.cos(i), math.cos(i / 100)]
    torch.testing.assert_close(emb[i * 4 + j], torch.tensor(ref))
    with_cls = sincos_2d(3, 4, 8, cls_token=True)
    assert with_cls.shape == (13, 8) and with_cls[0].abs().sum() == 0
    torch.testing.assert_close(with_cls[1:], emb, atol=0, rtol=0)


def test_sincos_2d_matches_mae_numpy_construction_exactly():
    # MAE / RAE construction in numpy (float32 grid, float64 omega), 16x16 grid, width 1152
    D, g = 1152, 16
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), 0)

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ref = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    ref = np.concatenate([np.zeros([1, D]), ref], axis=0)
    got = sincos_2d(g, g, D, cls_token=True)
    assert torch.equal(got, torch.from_numpy(ref).float())


def test_sincos_1d_hand_values():
    emb = sincos_1d(5, 4)  # omega = [1, 1/100]
    torch.testing.assert_close(emb[3], torch.tensor([math.sin(3), math.sin(0.03), math.cos(3), math.cos(0.03)]))


# ----------------------------------------------------------------------------- conditioning
def test_gaussian_fourier_W_is_frozen_but_saved():
    emb = GaussianFourierEmbedder(16, num_freqs=8)
    assert not emb.W.requires_grad and "W" in emb.state_dict() and emb.W.shape == (8,)
    assert all(p is not emb.W for p in emb.parameters() if p.requires_grad)
    t = torch.rand(3)
    emb(t).sum().backward()
    assert emb.W.grad is None and emb.mlp[0].weight.grad is not None
    other = GaussianFourierEmbedder(16, num_freqs=8)
    assert not torch.equal(other.W, emb.W)
    other.load_state_dict(emb.state_dict())
    torch.testing.assert_close(other(t), emb(t))


def test_label_embedder_dropout():
    emb = LabelEmbedder(10, 8, dropout_prob=1.0)
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.tensor([0, 3, 9, 5])
    emb.train()
    assert emb.drop(labels).tolist() == [10] * 4
    torch.testing.assert_close(emb(labels), emb.embedding_table.weight[10].expand(4, 8))
    emb.eval()
    assert torch.equal(emb.drop(labels), labels)
    forced = emb.drop(labels, force_drop=torch.tensor([1, 0, 0, 1]))
    assert forced.tolist() == [10, 3, 9, 10]
    no_drop = LabelEmbedder(10, 8, dropout_prob=0.0).train()
    assert torch.equal(no_drop.drop(labels), labels)
