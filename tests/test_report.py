import re

import numpy as np
import torch
from browser import screenshot
from PIL import Image

import modaldiag as md

HOSTILE = "<script>alert('x')</script>"


def _diagnosis(names=("a", "b")):
    data = md.datasets.synthetic(n_samples=300, num_classes=3, strength={names[0]: 2.5, names[1]: 0.5},
                                 dims=8, seed=0)
    torch.manual_seed(0)
    model = md.models.default_model(data, feature_dim=8)
    md.fit(model, data.train.loader(32, shuffle=True), data.val.loader(64), epochs=4, progress=False)
    return md.diagnose(model, data.train.loader(128), data.val.loader(128), fisher="batch"), data


def test_report_escapes_hostile_names(tmp_path):
    rep, _ = _diagnosis(names=(HOSTILE, "img\"><b>bold</b>"))
    rep.save(tmp_path, title=f"run {HOSTILE}", class_names=[HOSTILE, "<i>x</i>", "&amp;"])
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page and "<b>bold</b>" not in page and "<i>x</i>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&amp;amp;" in page
    assert page.count('src="data:image/png;base64,') >= 3
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from outside


def test_report_renders_in_headless_chromium_with_figures(tmp_path):
    rep, data = _diagnosis()
    rep.save(tmp_path, class_names=["x", "y", "z"])
    png = tmp_path / "shot.png"
    screenshot(tmp_path / "report.html", png, tmp_path)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert img.shape[0] >= 1000 and img.std() > 20  # not blank
    # the figures are drawn: pixels in the two modality colours of the colour-blind palette
    blue = (np.abs(img - np.array([1, 115, 178])).sum(-1) < 40).sum()
    orange = (np.abs(img - np.array([222, 143, 5])).sum(-1) < 40).sum()
    assert blue > 2000 and orange > 2000, (blue, orange)


def test_compare_plot_and_every_figure_saves_png_and_svg(tmp_path, synth):
    model = md.models.default_model(synth, feature_dim=8)
    h1 = md.fit(model, synth.train.loader(64), synth.val.loader(128), epochs=3, progress=False)
    h2 = md.fit(model, synth.train.loader(64), synth.val.loader(128), epochs=3, progress=False,
                regulator=md.InfoReg())
    figs = {"compare": md.plot.compare({"joint": h1, "InfoReg": h2}),
            "window": md.plot.learning_window(h2),
            "accuracy": md.plot.unimodal_accuracy(h1)}
    for name, fig in figs.items():
        paths = md.plot.save_figure(fig, tmp_path / name)
        assert {p.suffix for p in paths} == {".png", ".svg"}
        assert all(p.stat().st_size > 1000 for p in paths)
    # the InfoReg window plot carries the regulation strength on a second axis
    assert len(md.plot.learning_window(h2).axes) == 4
    three = md.plot.modality_colors(["a", "b", "c"])
    assert md.plot.modality_colors(["a", "b"]) == {"a": three["a"], "b": three["b"]}
