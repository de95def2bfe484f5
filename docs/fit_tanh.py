"""Fits the rational tanh of the CPU kernels (csrc/cpu/vec_math.h) and checks it in float32.

tanh(x) ~ x P(x^2) / Q(x^2) on x clamped to [-9, 9], P and Q of degree 4 in x^2, Q(0) = 1. The
relative error is minimised by linearised least squares (P - r Q = 0 weighted by 1 / (r Q_prev),
r = tanh(x)/x), with Lawson reweighting towards the minimax solution. The coefficients are then
rounded to float32 and the whole function is evaluated in float32 (clamp, Horner by multiply-add,
one divide) over a dense grid, against float64 tanh.

    python docs/fit_tanh.py

prints the coefficients as they appear in vec_math.h and the measured errors (relative error
<= 3.4e-7, |tanh| <= 1 + 2.4e-7; sigmoid through (1 + tanh(x/2))/2: absolute error <= 2e-7).
"""

import numpy as np

CLAMP = 9.0  # tanh(x) rounds to 1 in float32 from about 8.7 on
DEG_P, DEG_Q = 4, 4


def fit(deg_p=DEG_P, deg_q=DEG_Q, iters=60):
    x = np.sort(np.concatenate([np.linspace(1e-4, 1, 4000), np.linspace(1, CLAMP, 8000)]))
    y = x * x
    r = np.tanh(x) / x
    q_prev = np.ones_like(x)
    w = np.ones_like(x)
    for it in range(iters):
        a = np.concatenate([np.vander(y, deg_p + 1, increasing=True),
                            -r[:, None] * np.vander(y, deg_q + 1, increasing=True)[:, 1:]], 1)
        s = np.sqrt(w) / (q_prev * r)
        coef, *_ = np.linalg.lstsq(a * s[:, None], r * s, rcond=None)
        p, q = coef[:deg_p + 1], np.concatenate([[1.0], coef[deg_p + 1:]])
        q_prev = np.polyval(q[::-1], y)
        err = np.abs(np.polyval(p[::-1], y) / q_prev - r) / r
        if it > 10:  # Lawson: weight up where the error is large
            w = w * (err / err.max()) ** 0.3 + 1e-12
            w /= w.sum()
    return p.astype(np.float32), q.astype(np.float32)


def tanh_f32(p, q, x):
    """The kernel's arithmetic, in float32."""
    x = np.clip(x.astype(np.float32), np.float32(-CLAMP), np.float32(CLAMP))
    y = x * x
    num, den = p[-1], q[-1]
    for c in p[-2::-1]:
        num = num * y + c
    for c in q[-2::-1]:
        den = den * y + c
    return x * num / den


def main():
    p, q = fit()
    print("P (x^0 .. x^8):", ", ".join("%.9e" % c for c in p))
    print("Q (x^0 .. x^8):", ", ".join("%.9e" % c for c in q))
    tiny = np.geomspace(1e-30, 1e-2, 10000)
    xs = np.concatenate([np.linspace(-12, 12, 4_000_001), tiny, -tiny]).astype(np.float32)
    ref = np.tanh(xs.astype(np.float64))
    got = tanh_f32(p, q, xs).astype(np.float64)
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-38)
    print("tanh: max relative error %.2e, max abs error %.2e, max |tanh| - 1 = %.2e"
          % (rel.max(), np.abs(got - ref).max(), np.abs(got).max() - 1))
    half = np.float32(0.5)
    sig = (half * tanh_f32(p, q, half * xs) + half).astype(np.float64)
    print("sigmoid = (1 + tanh(x/2))/2: max abs error %.2e"
          % np.abs(sig - 1 / (1 + np.exp(-xs.astype(np.float64)))).max())


if __name__ == "__main__":
    main()
