"""Float64 NumPy references for the ops, written from MLX's definitions (not ferrofast's)."""

import numpy as np


def f64(x):
    """``x`` (any NumPy dtype, bfloat16 included) as float64."""
    return np.asarray(x).astype(np.float64)


def rms_norm(x, w, eps):
    x = f64(x)
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if w is None else y * f64(w)


def rms_norm_vjp(x, w, eps, g):
    x, g = f64(x), f64(g)
    wv = np.ones(x.shape[-1]) if w is None else f64(w)
    n = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    gw = g * wv
    dx = gw * n - x * np.mean(gw * x, axis=-1, keepdims=True) * n**3
    dw = (g * x * n).reshape(-1, x.shape[-1]).sum(0)
    return dx, (None if w is None else dw)


def layer_norm(x, w, b, eps):
    x = f64(x)
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    y = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    if w is not None:
        y = y * f64(w)
    if b is not None:
        y = y + f64(b)
    return y


def layer_norm_vjp(x, w, b, eps, g):
    x, g = f64(x), f64(g)
    d = x.shape[-1]
    wv = np.ones(d) if w is None else f64(w)
    xc = x - x.mean(-1, keepdims=True)
    n = 1.0 / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)
    gw = g * wv
    dx = (gw - gw.mean(-1, keepdims=True)) * n - xc * (gw * xc).mean(-1, keepdims=True) * n**3
    dw = (g * xc * n).reshape(-1, d).sum(0)
    db = g.reshape(-1, d).sum(0)
    return dx, (None if w is None else dw), (None if b is None else db)


def rope(x, dims, traditional, base, scale, offset, freqs=None):
    """Positions along axis -2, per-batch offsets along axis 0."""
    x = f64(x)
    t_len = x.shape[-2]
    half = dims // 2
    if freqs is None:
        inv = base ** (-np.arange(half) / half)
    else:
        inv = 1.0 / f64(freqs)
    off = np.asarray(offset, dtype=np.float64).reshape(-1)
    batch = x.shape[0]
    off = np.broadcast_to(off, (batch,)) if off.size == 1 else off
    # positions [B, T]
    pos = np.arange(t_len)[None, :] + off[:, None]
    theta = scale * pos[..., None] * inv  # [B, T, half]
    theta = theta.reshape((batch,) + (1,) * (x.ndim - 3) + (t_len, half))
    cos, sin = np.cos(theta), np.sin(theta)
    out = x.copy()
    if traditional:
        x1, x2 = x[..., 0:dims:2], x[..., 1:dims:2]
        out[..., 0:dims:2] = x1 * cos - x2 * sin
        out[..., 1:dims:2] = x1 * sin + x2 * cos
    else:
        x1, x2 = x[..., :half], x[..., half:dims]
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half:dims] = x1 * sin + x2 * cos
    return out


def _attention_parts(q, k, v, scale, mask, sinks):
    """Scores with the sink column, probabilities, and helpers (float64)."""
    q, k, v = f64(q), f64(k), f64(v)
    b, nq, tq, _ = q.shape
    nkv, tkv = k.shape[1], k.shape[2]
    rep = nq // nkv
    kk = np.repeat(k, rep, axis=1)
    vv = np.repeat(v, rep, axis=1)
    s = scale * q @ np.swapaxes(kk, -1, -2)  # [B, Nq, Tq, Tkv]
    visible = np.ones(s.shape, dtype=bool)
    if isinstance(mask, str):
        assert mask == "causal"
        qi = np.arange(tq)[:, None]
        ki = np.arange(tkv)[None, :]
        visible = np.broadcast_to(qi + (tkv - tq) >= ki, s.shape)
    elif mask is not None:
        m = np.asarray(mask)
        if m.dtype == np.bool_:
            visible = np.broadcast_to(m, s.shape)
        else:
            s = s + f64(m)
    s = np.where(visible, s, -np.inf)
    if sinks is not None:
        sink_col = np.broadcast_to(f64(sinks)[None, :, None, None], (b, nq, tq, 1))
        s = np.concatenate([s, sink_col], axis=-1)
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - mx)
    lse = (mx + np.log(e.sum(-1, keepdims=True)))[..., 0]
    p = e / e.sum(-1, keepdims=True)
    return q, kk, vv, p, lse, rep


def sdpa(q, k, v, scale, mask=None, sinks=None):
    _, _, vv, p, lse, _ = _attention_parts(q, k, v, scale, mask, sinks)
    tkv = vv.shape[2]
    return p[..., :tkv] @ vv, lse


def sdpa_vjp(q, k, v, scale, mask, sinks, d_out):
    qq, kk, vv, p, _, rep = _attention_parts(q, k, v, scale, mask, sinks)
    g = f64(d_out)
    tkv = vv.shape[2]
    pk = p[..., :tkv]
    out = pk @ vv
    dv = np.swapaxes(pk, -1, -2) @ g
    dp = g @ np.swapaxes(vv, -1, -2)
    delta = (g * out).sum(-1, keepdims=True)
    ds = pk * (dp - delta)
    dq = scale * ds @ kk
    dk = scale * np.swapaxes(ds, -1, -2) @ qq
    b, nq = qq.shape[:2]
    nkv = nq // rep
    dk = dk.reshape(b, nkv, rep, *dk.shape[2:]).sum(2)
    dv = dv.reshape(b, nkv, rep, *dv.shape[2:]).sum(2)
    dsinks = None
    if sinks is not None:
        dsinks = -(p[..., tkv] * delta[..., 0]).sum(axis=(0, 2))
    return dq, dk, dv, dsinks


def cross_entropy(logits, targets):
    x = f64(logits)
    t = np.asarray(targets).astype(np.int64)
    v = x.shape[-1]
    t = np.where(t < 0, t + v, t)
    mx = x.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(x, t[..., None], axis=-1)[..., 0]
    return lse - picked


def cross_entropy_grad(logits, targets, g):
    x = f64(logits)
    t = np.asarray(targets).astype(np.int64)
    e = np.exp(x - x.max(-1, keepdims=True))
    sm = e / e.sum(-1, keepdims=True)
    onehot = np.zeros_like(sm)
    np.put_along_axis(onehot, t[..., None], 1.0, axis=-1)
    return f64(g)[..., None] * (sm - onehot)


def gated_delta_update(q, k, v, g, beta, state=None, mask=None):
    """MLX's recurrence (spec 7.1) in float64: ``(out [B,T,Hv,Dv], state [B,Hv,Dv,Dk])``."""
    q, k, v, g, beta = f64(q), f64(k), f64(v), f64(g), f64(beta)
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2], v.shape[3]
    rep = hv // hk
    q, k = np.repeat(q, rep, axis=2), np.repeat(k, rep, axis=2)
    s = np.zeros((b, hv, dv, dk)) if state is None else f64(state).copy()
    out = np.zeros((b, t, hv, dv))
    for i in range(t):
        gi = g[:, i]
        gi = gi[:, :, None, :] if gi.ndim == 3 else gi[:, :, None, None]
        s_dec = s * gi
        kv = np.einsum("bhvk,bhk->bhv", s_dec, k[:, i])
        delta = (v[:, i] - kv) * beta[:, i][:, :, None]
        s_new = s_dec + delta[..., None] * k[:, i][:, :, None, :]
        if mask is not None:
            m = np.asarray(mask)[:, i].astype(bool)[:, None, None, None]
            s = np.where(m, s_new, s)
        else:
            s = s_new
        o = np.einsum("bhvk,bhk->bhv", s, q[:, i])
        if mask is not None:
            o = np.where(np.asarray(mask)[:, i].astype(bool)[:, None, None], o, 0.0)
        out[:, i] = o
    return out, s
