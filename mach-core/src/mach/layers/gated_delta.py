"""The gated delta rule (Gated DeltaNet): recurrent form for decode, chunked form for prefill.

Shapes: ``q, k [B, L, H, Dk]``, ``v [B, L, H, Dv]``, ``g`` (log decay, <= 0) and ``beta``
``[B, L, H]``, state ``[B, H, Dk, Dv]``; grouped heads are repeated by the caller. Both forms
take L2-normalised queries and keys, scale queries by ``Dk ** -0.5`` and run in float32. Per
head and step, with ``S`` the state:

    S = S * exp(g);  d = beta * (v - S^T k);  S = S + k d^T;  o = S^T q
"""

from __future__ import annotations

import mlx.core as mx

CHUNK = 64


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def _prepare(q: mx.array, k: mx.array) -> tuple[mx.array, mx.array]:
    q, k = l2norm(q.astype(mx.float32)), l2norm(k.astype(mx.float32))
    return q * (q.shape[-1] ** -0.5), k


def recurrent_gated_delta(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array,
    record: bool = False,
) -> tuple[mx.array, mx.array, list[mx.array]]:  # fmt: skip
    """Token by token; returns outputs ``[B, L, H, Dv]``, the final state and (``record``) the
    state after every token."""
    q, k = _prepare(q, k)
    v, g, beta = v.astype(mx.float32), g.astype(mx.float32), beta.astype(mx.float32)
    outputs, states = [], []
    for t in range(q.shape[1]):
        state = state * mx.exp(g[:, t])[..., None, None]
        kt = k[:, t]
        memory = (state * kt[..., None]).sum(axis=-2)
        delta = (v[:, t] - memory) * beta[:, t][..., None]
        state = state + kt[..., None] * delta[..., None, :]
        outputs.append((state * q[:, t][..., None]).sum(axis=-2))
        if record:
            states.append(state)
    return mx.stack(outputs, axis=1), state, states


def _unit_lower_inverse(strict: mx.array) -> mx.array:
    """``(I + N)^-1`` for strictly lower-triangular ``N`` [..., C, C], by repeated squaring."""
    size = strict.shape[-1]
    eye = mx.eye(size, dtype=strict.dtype)
    power = -strict
    inverse = eye + power
    steps = 1
    while 2**steps < size:
        power = power @ power
        inverse = inverse @ (eye + power)
        steps += 1
    return inverse


def chunked_gated_delta(
    q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array,
    chunk: int = CHUNK,
) -> tuple[mx.array, mx.array]:  # fmt: skip
    """Whole chunks at a time (WY form); returns outputs ``[B, L, H, Dv]`` and the final state."""
    q, k = _prepare(q, k)
    b, length, h, _ = q.shape
    dv = v.shape[-1]
    pad = (chunk - length % chunk) % chunk

    def heads_first(x: mx.array) -> mx.array:
        x = x.astype(mx.float32).swapaxes(1, 2)
        if pad:
            widths = [(0, 0)] * x.ndim
            widths[2] = (0, pad)
            x = mx.pad(x, widths)
        return x

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    g, beta = heads_first(g[..., None])[..., 0], heads_first(beta[..., None])[..., 0]
    n = (length + pad) // chunk
    q, k, v = (x.reshape(b, h, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(b, h, n, chunk), beta.reshape(b, h, n, chunk)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = mx.cumsum(g, axis=-1)
    lower = mx.tril(mx.ones((chunk, chunk), dtype=mx.bool_))
    decay = mx.where(lower, mx.exp(cum[..., :, None] - cum[..., None, :]), 0.0)
    strict = mx.where(mx.tril(lower, -1), (k_beta @ k.swapaxes(-1, -2)) * decay, 0.0)
    inverse = _unit_lower_inverse(strict)
    values = inverse @ v_beta
    k_cum = inverse @ (k_beta * mx.exp(cum)[..., None])
    intra = (q @ k.swapaxes(-1, -2)) * decay
    q = q * mx.exp(cum)[..., None]
    k = k * mx.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = mx.exp(cum[..., -1])[..., None, None]
    outputs = []
    for i in range(n):
        v_new = values[:, :, i] - k_cum[:, :, i] @ state
        outputs.append(q[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + k[:, :, i].swapaxes(-1, -2) @ v_new
    out = mx.stack(outputs, axis=2).reshape(b, h, n * chunk, dv)[:, :, :length]
    return out.swapaxes(1, 2), state
