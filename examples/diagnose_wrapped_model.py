"""Diagnose an existing model that was not built with modaldiag (md.wrap keeps its weights).

The model below has the shape of the published audio-visual classifiers: ``audio_net``,
``visual_net`` and a ``fusion_module`` over concatenated features. Here the "audio" and "visual"
inputs are the accelerometer and gyroscope windows of the embedded HAPT data.

Run: python examples/diagnose_wrapped_model.py
"""

import tempfile

import torch
from torch import nn

import modaldiag as md


class AVNet(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.audio_net = nn.Sequential(nn.Conv1d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(4),
                                       nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(),
                                       nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.visual_net = nn.Sequential(nn.Conv1d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool1d(4),
                                        nn.Conv1d(16, 32, 5, padding=2), nn.ReLU(),
                                        nn.AdaptiveAvgPool1d(1), nn.Flatten())
        self.fusion_module = nn.Linear(64, num_classes)

    def forward(self, audio, visual):
        return self.fusion_module(torch.cat([self.audio_net(audio), self.visual_net(visual)], 1))


def main(epochs: int = 3, out: str | None = None) -> dict:
    data = md.datasets.load("hapt")
    torch.manual_seed(0)
    net = AVNet(data.num_classes)
    wrapped = md.wrap(net, encoders={"accel": net.audio_net, "gyro": net.visual_net},
                      head=lambda f: net.fusion_module(torch.cat([f["accel"], f["gyro"]], 1)),
                      num_classes=data.num_classes)
    # train it (any loop would do; md.fit is the shortest)
    md.fit(wrapped, data.train.loader(128, shuffle=True), data.val.loader(512), epochs=epochs,
           lr=0.05, progress=False)
    train_subset = data.train.subset(range(0, len(data.train), 4))  # a quarter is enough to diagnose
    rep = md.diagnose(wrapped, train_subset.loader(512), data.val.loader(512), fisher="batch")
    print(rep.summary)
    out = out or tempfile.mkdtemp(prefix="modaldiag-wrapped-")
    rep.save(out, title="Diagnosis of a wrapped audio-visual-style model on HAPT",
             class_names=data.class_names)
    print(f"report: {out}/report.html")
    return {"dominant": rep.dominant, "weakest": rep.weakest}


if __name__ == "__main__":
    main()
