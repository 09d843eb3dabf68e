"""Watch the prime learning window while training, and plot it.

Run: python examples/learning_window.py
"""

import tempfile

import torch

import modaldiag as md


class PrintWindow(md.Callback):
    """A tiny callback: print each epoch's Fisher traces as they are recorded."""

    def on_train_epoch_end(self, ctx):
        traces = ctx.logs.get("fisher", {})
        print(f"epoch {ctx.epoch}: " + ", ".join(f"Tr F[{m}] = {v:.3f}" for m, v in traces.items()))


def main(epochs: int = 12, out: str | None = None) -> dict:
    data = md.datasets.load("mfeat-fou-pix")
    torch.manual_seed(0)
    model = md.models.default_model(data)
    history = md.fit(model, data.train.loader(64, shuffle=True), data.val.loader(400),
                     epochs=epochs, monitor=True, callbacks=[PrintWindow()], progress=False)
    window = md.learning_window(history)
    print("window open (epochs):", window.open_epochs(), "peak growth:", window.peak_growth_epoch)
    out = out or tempfile.mkdtemp(prefix="modaldiag-window-")
    paths = md.plot.save_figure(md.plot.learning_window(history), f"{out}/learning_window")
    print("figure:", [str(p) for p in paths])
    return window.open_epochs()


if __name__ == "__main__":
    main()
