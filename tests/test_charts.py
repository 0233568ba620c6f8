"""PNG charts without matplotlib: the files decode as valid PNGs and show what was asked for."""
import math
import struct
import zlib

import numpy as np
import pytest

from psnrl.trainer.charts import PALETTE, bar_chart, line_chart, stacked_bar_chart, write_png


def read_png(path) -> np.ndarray:
    """Decode an 8-bit RGB, non-interlaced PNG (filter 0 rows), checking every chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + length
    assert pos == len(data)
    assert [t for t, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert (rows[:, 0] == 0).all()  # filter type None on every row
    return rows[:, 1:].reshape(height, width, 3)


def has_color(img: np.ndarray, color) -> bool:
    return bool((img == np.array(color, np.uint8)).all(axis=-1).any())


def dark(img: np.ndarray) -> np.ndarray:
    return (img < 80).all(axis=-1)


def test_write_png_round_trips_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(7, 11, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", pixels)
    assert np.array_equal(read_png(tmp_path / "a.png"), pixels)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left behind


def test_line_chart_draws_every_series_title_and_legend(tmp_path):
    x = np.arange(1, 51)
    line_chart(tmp_path / "c.png", {"reward": (x, np.sin(x / 8)), "mean": (x, np.cos(x / 8))},
               secondary={"sigma": (x, 0.004 + 1e-4 * x)}, title="reward and sigma", xlabel="iteration",
               ylabel="reward", secondary_label="sigma")
    img = read_png(tmp_path / "c.png")
    assert img.shape == (540, 960, 3)
    for color in PALETTE[:3]:
        assert has_color(img, color)
    assert not has_color(img, PALETTE[3])
    assert dark(img[:40]).sum() > 100  # the title
    assert dark(img[-40:]).sum() > 100  # the legend
    line_chart(tmp_path / "bare.png", {"reward": (x, np.sin(x / 8))})
    bare = read_png(tmp_path / "bare.png")
    assert dark(bare[:40]).sum() < dark(img[:40]).sum()


def test_log_axes_nan_single_points_and_constants(tmp_path):
    ks = [1, 2, 4, 8, 16]
    line_chart(tmp_path / "log.png", {"a": (ks, [0.4, 0.5, math.nan, 0.8, 0.85]), "b": (ks, [0.3, 0.4, 0.5, 0.6, 0.7])},
               logx=True, title="pass@k", xlabel="k")
    assert has_color(read_png(tmp_path / "log.png"), PALETTE[1])
    line_chart(tmp_path / "one.png", {"a": ([3], [0.5])}, title="one point")
    assert has_color(read_png(tmp_path / "one.png"), PALETTE[0])
    line_chart(tmp_path / "flat.png", {"a": ([1, 2, 3], [0.004] * 3)}, logy=True)
    line_chart(tmp_path / "zero.png", {"a": ([1, 2, 3], [0, 0, 0]), "gone": ([], [])})
    assert has_color(read_png(tmp_path / "zero.png"), PALETTE[0])
    line_chart(tmp_path / "huge.png", {"tok/s": ([1, 2], [1.2e5, 3e5]), "tiny": ([1, 2], [1e-7, 2e-7])},
               title="unknown chars: \u03c3 \u2192 ?")


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
    assert not (tmp_path / "x.png").exists()


def test_grouped_and_stacked_bars(tmp_path):
    cats = ["math500", "aime24", "aime25", "a-very-long-benchmark-name"]
    bar_chart(tmp_path / "bar.png", cats, {"PSN": [0.7, 0.2, -0.1, 0.5], "GRPO": [0.6, math.nan, 0.1, 0.4]},
              title="pass@1", ylabel="pass@1")
    img = read_png(tmp_path / "bar.png")
    assert has_color(img, PALETTE[0]) and has_color(img, PALETTE[1])
    stacked_bar_chart(tmp_path / "stack.png", ["tiny", "1.5b"],
                      {"rollout": [1.0, 30.0], "reward": [0.1, 2.0], "learner": [0.5, 20.0]},
                      title="step time by phase", ylabel="seconds")
    img = read_png(tmp_path / "stack.png")
    # The 1.5b bar is rollout at the bottom, learner on top: its column is mostly those colors.
    column = img[:, 960 * 3 // 4 + 40]
    colors = [tuple(c) for c in column]
    assert colors.count(PALETTE[0]) > colors.count(PALETTE[2]) > colors.count(PALETTE[1]) > 0
    top_learner = min(i for i, c in enumerate(colors) if c == PALETTE[2])
    assert top_learner < min(i for i, c in enumerate(colors) if c == PALETTE[0])
