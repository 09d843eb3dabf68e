"""Point modaldiag at a CREMA-D / Kinetics-Sounds style folder.

This example first writes a tiny synthetic folder in that layout (spectrogram .npy per clip,
extracted frames per clip, train/test CSVs); with the real dataset, skip that step and pass its
root. Run: python examples/av_folder.py [ROOT]
"""

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import modaldiag as md


def write_tiny_folder(root: Path, clips_per_split=(24, 12), labels=("ANG", "HAP", "SAD")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "visual").mkdir(exist_ok=True)
    for split, n in zip(("train", "test"), clips_per_split, strict=True):
        rows = ["clip,label"]
        for i in range(n):
            clip, label = f"{split}_{i:04d}", i % len(labels)
            rows.append(f"{clip},{labels[label]}")
            spec = rng.standard_normal((32, 40)).astype(np.float32)
            spec[label * 8:(label + 1) * 8] += 1.5  # class signal in the audio
            np.save(root / "audio" / f"{clip}.npy", spec)
            (root / "visual" / clip).mkdir(exist_ok=True)
            for f in range(3):
                img = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
                Image.fromarray(img).save(root / "visual" / clip / f"frame_{f:03d}.jpg")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def main(root: str | None = None, epochs: int = 10) -> dict:
    root = Path(root) if root else write_tiny_folder(Path(tempfile.mkdtemp(prefix="avfolder-")))
    data = md.datasets.av_folder(root, num_frames=2, image_size=32, audio_length=40)
    print(data)
    torch.manual_seed(0)
    model = md.models.default_model(data, feature_dim=16)
    md.fit(model, data.train.loader(8, shuffle=True), data.val.loader(8), epochs=epochs,
           progress=False)
    scores = md.unimodal_scores(model, data.test.loader(8))
    result = {m: round(s.accuracy, 3) for m, s in scores.items()}
    print("unimodal test accuracy:", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
