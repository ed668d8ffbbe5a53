"""Test-time augmentation: the paper's 16 views, each with an exact inverse.

The paper (section 3.4) uses "flips, and 90-180-270 rotations only in the axial plane". Tensors
here are (B, C, Z, Y, X) in SimpleITK's order, so the axial plane is (Y, X), dims -2 and -1.

Which 16 views, and why they are 16 different transforms
---------------------------------------------------------
Every view flips some axes, then rotates by `k` quarter turns in the (Y, X) plane. The transforms
that flips on any axis and axial quarter turns can make form a group of exactly 16 elements:

- the 8 symmetries of a square in the (Y, X) plane (the dihedral group D4): 4 rotations by
  0/90/180/270 degrees, and the same 4 rotations after an X flip (which give the 4 mirrors:
  X flip, the two diagonal transposes, and Y flip);
- each of those with or without a Z flip (Z is untouched by any axial transform, so a Z flip
  doubles the set).

So `VIEWS` is {no flip, X flip} x {no flip, Z flip} x {0, 1, 2, 3 quarter turns}. A Y flip is not
listed on its own because it is already there: flip Y = rotate 180 degrees after flip X, and
flipping Y and X together = rotating 180 degrees. A naive {none, Z, Y, X flip} x {4 rotations}
grid names 16 views but holds only 12 different transforms (Y flip + k turns equals X flip +
k + 2 turns), so some views would count twice and the Z-flipped rotations would be missing.

Every operation is a permutation of voxels (`torch.flip`, `torch.rot90`), so the inverse is exact:
undo the rotation first, then the flips (the authors' code undid them in the wrong order for
4 of its 16 views, and those came back rotated by 180 degrees).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

AXES: tuple[str, ...] = ("Z", "Y", "X")
_DIM = {"Z": -3, "Y": -2, "X": -1}  # (B, C, Z, Y, X): counted from the end so any leading dims work
_PLANE = (_DIM["Y"], _DIM["X"])  # the axial plane; rot90 turns Y towards X


@dataclass(frozen=True)
class View:
    """One test-time view: flip the axes in `flip`, then turn `k` quarter turns in the (Y, X) plane."""

    k: int = 0
    flip: tuple[str, ...] = ()  # a subset of AXES, in AXES order

    def __post_init__(self) -> None:
        if self.k not in (0, 1, 2, 3):
            raise ValueError(f"View.k must be 0, 1, 2 or 3 quarter turns, got {self.k!r}")
        if any(a not in AXES for a in self.flip) or len(set(self.flip)) != len(self.flip):
            raise ValueError(f"View.flip must be distinct axes among {AXES}, got {self.flip!r}")
        # One spelling per view, so equal views compare and hash equal.
        object.__setattr__(self, "flip", tuple(a for a in AXES if a in self.flip))

    @property
    def name(self) -> str:
        flips = "".join(self.flip) or "-"
        return f"flip{flips}_rot{90 * self.k}"

    @property
    def swaps_yx(self) -> bool:
        """True when the view's output has Y and X sizes exchanged (odd quarter turns)."""
        return self.k % 2 == 1


VIEWS: tuple[View, ...] = tuple(
    View(k=k, flip=flip_z + flip_x)
    for flip_z in ((), ("Z",))
    for flip_x in ((), ("X",))
    for k in range(4)
)
"""The 16 views, identity first. See the module docstring for why these and why all differ."""


def apply(view: View, x: torch.Tensor) -> torch.Tensor:
    """The view of `x` (..., Z, Y, X): flips, then quarter turns in the (Y, X) plane."""
    _check_ndim(x)
    if view.flip:
        x = torch.flip(x, dims=[_DIM[a] for a in view.flip])
    if view.k:
        x = torch.rot90(x, view.k, dims=_PLANE)  # (..., Z, X, Y) when k is odd
    return x


def invert(view: View, y: torch.Tensor) -> torch.Tensor:
    """Bring `y`, computed on `apply(view, x)`, back to `x`'s frame: `invert(v, apply(v, x)) == x`.

    Order matters: the rotation was applied last, so it is undone first. (Flips about Y or X do
    not commute with a quarter turn; undoing them first is the bug of the authors' code.)
    """
    _check_ndim(y)
    if view.k:
        y = torch.rot90(y, -view.k, dims=_PLANE)
    if view.flip:
        y = torch.flip(y, dims=[_DIM[a] for a in view.flip])
    return y


def view_shape(view: View, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape `apply(view, x)` has, for `x.shape == shape`: Y and X swap on odd quarter turns."""
    shape = tuple(shape)
    if view.swaps_yx:
        shape = shape[:-2] + (shape[-1], shape[-2])
    return shape


def predict_tta(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    views: Sequence[View] = VIEWS,
    batch_views: int | None = None,
) -> torch.Tensor:
    """Mean over `views` of sigmoid(model_fn(view of x)), each brought back: probabilities (B, K, Z, Y, X).

    `model_fn` maps (N, C, Z', Y', X') to logits (N, K, Z', Y', X') (K = 3 region channels for our
    models), keeping the spatial size; in eval mode, since a deep-supervision tuple is refused.
    Views run batched: their inputs are concatenated along the batch dim, `batch_views` views per
    forward call (None: all views of the same shape in one call). Views with odd quarter turns
    have Y and X sizes swapped, so when Y != X they go in a separate call from the others; when
    Y == X all views share one. The sigmoid and the average are computed in float32, whatever
    dtype the model returns (e.g. under autocast). Gradients are not tracked.

    Averaging probabilities (not logits) is what the paper did for its 80 predictions per case.
    """
    if x.ndim != 5:
        raise ValueError(f"predict_tta expects (B, C, Z, Y, X), got shape {tuple(x.shape)}")
    views = tuple(views)
    if not views:
        raise ValueError("predict_tta needs at least one view")
    if batch_views is not None and batch_views < 1:
        raise ValueError(f"batch_views must be a positive number of views or None, got {batch_views}")

    # Group views by the shape the model sees, keeping VIEWS order inside a group.
    groups: dict[tuple[int, ...], list[View]] = {}
    for v in views:
        groups.setdefault(view_shape(v, x.shape), []).append(v)

    b = x.shape[0]
    total: torch.Tensor | None = None
    with torch.no_grad():
        for group in groups.values():
            step = len(group) if batch_views is None else batch_views
            for start in range(0, len(group), step):
                chunk = group[start : start + step]
                inputs = torch.cat([apply(v, x) for v in chunk], dim=0)  # (len(chunk) * B, C, *shape)
                logits = model_fn(inputs)
                if not isinstance(logits, torch.Tensor):
                    raise TypeError(
                        f"model_fn must return a logits tensor, got {type(logits).__name__}; "
                        "put the model in eval mode (deep supervision returns a tuple in training)"
                    )
                if logits.ndim != 5 or logits.shape[0] != inputs.shape[0] or logits.shape[2:] != inputs.shape[2:]:
                    raise ValueError(
                        f"model_fn returned shape {tuple(logits.shape)} for input {tuple(inputs.shape)}; "
                        "expected (N, K, Z, Y, X) with the input's N, Z, Y, X"
                    )
                probs = torch.sigmoid(logits.float())
                for i, v in enumerate(chunk):
                    back = invert(v, probs[i * b : (i + 1) * b])  # (B, K, Z, Y, X)
                    total = back.clone() if total is None else total.add_(back)
    assert total is not None
    return total / len(views)


def _check_ndim(x: torch.Tensor) -> None:
    if x.ndim < 3:
        raise ValueError(f"expected a tensor ending in (Z, Y, X), got shape {tuple(x.shape)}")
