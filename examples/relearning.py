"""Targeted re-training with Diagnosing & Re-learning, then compare with joint training.

Run: python examples/relearning.py
"""

import torch

import modaldiag as md


def main(epochs: int = 6) -> dict:
    data = md.datasets.load("hapt")
    train = data.train.subset(range(0, len(data.train), 4))  # a quarter of the windows keeps it quick
    results = {}
    for name, regulator in [("joint", None), ("re-learning", md.Relearning(every=2, max_resets=2))]:
        torch.manual_seed(0)
        model = md.models.default_model(data)
        md.fit(model, train.loader(128, shuffle=True), data.val.loader(512), epochs=epochs,
               regulator=regulator, lr=0.05, progress=False)
        scores = md.unimodal_scores(model, data.test.loader(512))
        results[name] = {m: round(s.accuracy, 3) for m, s in scores.items()}
        if regulator is not None:
            for event in regulator.history:
                print(f"epoch {event['epoch']}: purity gap {event['gap']} -> alpha {event['alpha']}")
    print("unimodal test accuracy:", results)
    return results


if __name__ == "__main__":
    main()
