"""Figures are part of the results: the same data must give the same picture (bootstrapped CIs are seeded)."""
import io

import numpy as np
import pandas as pd

from amanlib import plots


def _pixels(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="rgba", dpi=50)
    plots.plt.close(fig)
    return buf.getvalue()


def test_figures_with_confidence_intervals_are_deterministic():
    rng = np.random.default_rng(0)
    history = pd.DataFrame({"fold": np.repeat(np.arange(6), 5), "epoch": np.tile(np.arange(5), 6),
                            "train_loss": rng.random(30), "train_acc": rng.random(30), "test_acc": rng.random(30)})
    alpha, groups = rng.random((12, 3, 4)), pd.Series(["happy", "sad", "surprise"] * 4)
    for draw in (lambda: plots.learning_curves(history),
                 lambda: plots.attention_by_factor(alpha, [1, 2, 4, 8], groups, "alpha")):
        np.random.seed(1)
        first = _pixels(draw())
        np.random.seed(2)  # the global RNG differs between the two renders, as between two runs
        assert _pixels(draw()) == first
