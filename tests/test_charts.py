"""PNG charts on matplotlib: the files decode and show what was asked for; without matplotlib,
one clear error."""
import math
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402

from psnrl.trainer import charts  # noqa: E402
from psnrl.trainer.charts import bar_chart, line_chart, stacked_bar_chart  # noqa: E402

# matplotlib's default cycle C0..C3 (what the charts draw series in, in order)
C = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def read_png(path) -> np.ndarray:
    img = imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4)
    return np.round(img[..., :3] * 255).astype(np.uint8)


def pixels_of(img: np.ndarray, color) -> np.ndarray:
    return (img == np.array(color, np.uint8)).all(axis=-1)


def test_line_chart_draws_every_series_and_the_right_axis(tmp_path):
    x = np.arange(1, 51)
    line_chart(tmp_path / "c.png", {"reward": (x, np.sin(x / 8)), "mean": (x, np.cos(x / 8))},
               secondary={"sigma": (x, 0.004 + 1e-4 * x)}, title="reward and sigma", xlabel="iteration",
               ylabel="reward", secondary_label="sigma")
    img = read_png(tmp_path / "c.png")
    assert img.shape == (450, 800, 3)
    for color in C[:3]:
        assert pixels_of(img, color).sum() > 20
    assert not pixels_of(img, C[3]).any()
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]  # written atomically: no temp file left


def test_log_axes_nan_single_points_and_constants(tmp_path):
    ks = [1, 2, 4, 8, 16]
    line_chart(tmp_path / "log.png", {"a": (ks, [0.4, 0.5, math.nan, 0.8, 0.85]), "b": (ks, [0.3, 0.4, 0.5, 0.6, 0.7])},
               logx=True, title="pass@k", xlabel="k")
    assert pixels_of(read_png(tmp_path / "log.png"), C[1]).any()
    line_chart(tmp_path / "one.png", {"a": ([3], [0.5])}, title="one point")
    assert pixels_of(read_png(tmp_path / "one.png"), C[0]).any()
    line_chart(tmp_path / "flat.png", {"a": ([1, 2, 3], [0.004] * 3)}, logy=True)
    line_chart(tmp_path / "zero.png", {"a": ([1, 2, 3], [0, 0, 0]), "gone": ([], [])})
    line_chart(tmp_path / "text.png", {"tok/s": ([1, 2], [1.2e5, 3e5])}, title="σ → ?")


def test_empty_input_is_a_clear_error(tmp_path):
    for series in ({}, {"a": ([], [])}, {"a": ([1, 2], [math.nan, math.nan])}):
        with pytest.raises(ValueError, match="no data"):
            line_chart(tmp_path / "x.png", series)
    with pytest.raises(ValueError, match="no data"):
        line_chart(tmp_path / "x.png", {"a": ([1, 2], [0, -1])}, logy=True)
    with pytest.raises(ValueError, match="2 x values but 1 y values"):
        line_chart(tmp_path / "x.png", {"a": ([1, 2], [1])})
    with pytest.raises(ValueError, match="at least one category"):
        bar_chart(tmp_path / "x.png", [], {"a": []})
    with pytest.raises(ValueError, match="no finite values"):
        bar_chart(tmp_path / "x.png", ["a"], {"s": [math.nan]})
    with pytest.raises(ValueError, match="1 values for 2 categories"):
        stacked_bar_chart(tmp_path / "x.png", ["a", "b"], {"s": [1]})
    assert not list(tmp_path.iterdir())


def test_grouped_and_stacked_bars(tmp_path):
    cats = ["math500", "aime24", "aime25", "a-very-long-benchmark-name"]
    bar_chart(tmp_path / "bar.png", cats, {"PSN": [0.7, 0.2, -0.1, 0.5], "GRPO": [0.6, math.nan, 0.1, 0.4]},
              title="pass@1", ylabel="pass@1")
    img = read_png(tmp_path / "bar.png")
    assert pixels_of(img, C[0]).sum() > 100 and pixels_of(img, C[1]).sum() > 100
    stacked_bar_chart(tmp_path / "stack.png", ["tiny", "1.5b"],
                      {"rollout": [1.0, 30.0], "reward": [0.1, 2.0], "learner": [0.5, 20.0]},
                      title="step time by phase", ylabel="seconds")
    img = read_png(tmp_path / "stack.png")
    # The 1.5b bar: rollout at the bottom, then reward, learner on top, each as tall as its value.
    column = img[:, int(np.argmax(pixels_of(img, C[0]).sum(axis=0)))]
    rows = {k: np.flatnonzero(pixels_of(column[:, None], C[k])[:, 0]) for k in range(3)}
    assert rows[2].max() < rows[1].min() <= rows[1].max() < rows[0].min()
    assert len(rows[0]) > len(rows[2]) > len(rows[1]) > 0


def test_without_matplotlib_every_chart_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert not charts.available()
    with pytest.raises(charts.ChartsUnavailable, match=r"pip install 'psnrl\[plots\]'"):
        line_chart(tmp_path / "x.png", {"a": ([1], [1])})
    with pytest.raises(ImportError):
        bar_chart(tmp_path / "x.png", ["a"], {"s": [1]})
    assert not list(tmp_path.iterdir())


def test_a_run_without_matplotlib_says_the_plot_is_not_drawn(tmp_path, monkeypatch, capsys):
    import json

    from psnrl.trainer.run_logs import plot_reward_sigma

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"iteration": i, "reward_mean": 0.1 * i, "sigma": 0.004}) + "\n"
                               for i in range(1, 4)))
    plot_reward_sigma(metrics, tmp_path / "reward_sigma.png")
    assert (tmp_path / "reward_sigma.png").is_file()
    (tmp_path / "reward_sigma.png").unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    plot_reward_sigma(metrics, tmp_path / "reward_sigma.png")
    assert "reward_sigma.png not drawn: matplotlib is not installed" in capsys.readouterr().err
    assert not (tmp_path / "reward_sigma.png").exists()
