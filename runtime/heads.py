"""The Nectar heads' carried three-product form, built from a fitted pair's joint weights with numpy alone.

Export builds a single-file bundle's JointPair initializers with `carried` (graphs/step.py calls it), and the
runtime builds a pack's head inputs with the same function, so a pack stores only the fitted joint weights
(about a quarter of the carried ones) and its heads come out bit for bit the bundle's. The form itself, why it
carries q, -q and a constant column through the three products, is JointPair's docstring in graphs/step.py.

    joint weights (MLPPair.joint_weights):  w1 [H, D, h + 1 + D]  b1 [H, 1, h + 1 + D]  w2 [H, h, h]
                                            b2 [H, 1, h]          w3 [H, h, 1 + D]      b3 [H, 1, 1 + D]
    carried:                                w1 [H, D, W]  b1 [H, 1, W]  w2 [H, W, W]  w3 [H, W, O]
    with W = aligned(h + 2 D + 1) and O = aligned(1 + D); h is both networks' hidden width, side by side
"""

from __future__ import annotations

import numpy as np

# fp16-exact pre-activation of the constant column a JointPair carries through its layers: silu(16) rounds to 16
CARRIER = 16.0
# a JointPair's widths are padded to a multiple of this many columns (16 fp16 = 32 bytes)
WIDTH_ALIGN = 16
JOINT_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")


def aligned(width: int) -> int:
    return -(-width // WIDTH_ALIGN) * WIDTH_ALIGN


def silu_carrier() -> float:
    """silu(CARRIER) in float64: the constant every carried column holds after an activation."""
    return CARRIER / (1.0 + float(np.exp(-CARRIER)))


def joint_problem(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, w3: np.ndarray,
                  b3: np.ndarray) -> str | None:
    """Why six arrays are not one pair's joint weights (shapes that do not chain), or None."""
    if w1.ndim != 3:
        return f"w1 has {w1.ndim} dimensions, not 3"
    heads, dim, first = w1.shape
    hidden = first - dim - 1 if first > dim + 1 else 0
    if hidden < 1 or w2.ndim != 3 or tuple(w2.shape) != (heads, hidden, hidden):
        return f"w1 {list(w1.shape)} and w2 {list(w2.shape)} do not chain (w2 must be [H, h, h])"
    want = {"b1": (heads, 1, first), "b2": (heads, 1, hidden), "w3": (heads, hidden, 1 + dim),
            "b3": (heads, 1, 1 + dim)}
    for name, array in (("b1", b1), ("b2", b2), ("w3", w3), ("b3", b3)):
        if tuple(array.shape) != want[name]:
            return f"{name} has shape {list(array.shape)}, w1 and w2 need {list(want[name])}"
    return None


def carried(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, w3: np.ndarray,
            b3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(w1, b1, w2, w3) of the three-product network equal to silu(silu(q w1 + b1)[:h] w2 + b2) w3 + b3 + skip,
    skip = (q w1 + b1)[h:]. Computed in float64 from arrays of any float type, returned in float32."""
    if (problem := joint_problem(w1, b1, w2, b2, w3, b3)) is not None:
        raise ValueError(f"not a pair's joint weights: {problem}")
    w1, b1, w2, b2, w3, b3 = (np.asarray(t, dtype=np.float64) for t in (w1, b1, w2, b2, w3, b3))
    heads, dim, hidden = w1.shape[0], w1.shape[1], w2.shape[1]
    eye = np.broadcast_to(np.eye(dim), (heads, dim, dim))
    c = silu_carrier()

    def zeros(*shape: int) -> np.ndarray:
        return np.zeros(shape)

    # layer 1: [hidden, q, -q, CARRIER]
    big_w1 = np.concatenate([w1[..., :hidden], eye, -eye, zeros(heads, dim, 1)], -1)
    big_b1 = np.concatenate([b1[..., :hidden], zeros(heads, 1, 2 * dim), np.full((heads, 1, 1), CARRIER)], -1)
    # layer 2: rows [silu hidden, silu q, silu -q, c] -> [hidden2, q, -q, CARRIER]
    pass_q = np.concatenate([np.concatenate([eye, -eye], -1), np.concatenate([-eye, eye], -1)], 1)   # [H, 2D, 2D]
    carrier_in = np.concatenate([zeros(heads, 1, 2 * dim), np.full((heads, 1, 1), CARRIER / c)], -1)
    big_w2 = np.concatenate([
        np.concatenate([w2, zeros(heads, hidden, 2 * dim + 1)], -1),
        np.concatenate([zeros(heads, 2 * dim, w2.shape[-1]), pass_q, zeros(heads, 2 * dim, 1)], -1),
        np.concatenate([b2 / c, carrier_in], -1),
    ], 1)
    # layer 3: rows [silu hidden2, silu q, silu -q, c] -> w3 silu(hidden2) + b3 + q skip_w + skip_b
    skip_w, skip_b = w1[..., hidden:], b1[..., hidden:]
    big_w3 = np.concatenate([w3, skip_w, -skip_w, (b3 + skip_b) / c], 1)
    # zero padding: a padded column's pre-activation is 0, silu(0) = 0, and padded rows are 0
    wide, out = carried_width(w1.shape), aligned(big_w3.shape[-1])
    big_w1 = np.pad(big_w1, ((0, 0), (0, 0), (0, wide - big_w1.shape[-1])))
    big_b1 = np.pad(big_b1, ((0, 0), (0, 0), (0, wide - big_b1.shape[-1])))
    big_w2 = np.pad(big_w2, ((0, 0), (0, wide - big_w2.shape[-2]), (0, wide - big_w2.shape[-1])))
    big_w3 = np.pad(big_w3, ((0, 0), (0, wide - big_w3.shape[-2]), (0, out - big_w3.shape[-1])))
    return tuple(np.ascontiguousarray(t, dtype=np.float32) for t in (big_w1, big_b1, big_w2, big_w3))


def carried_width(w1_shape: tuple[int, ...]) -> int:
    """The carried form's width W for a joint w1 of this shape (the base's `nectar_width` axis)."""
    dim = w1_shape[1]
    return aligned(w1_shape[2] - dim - 1 + 2 * dim + 1)
